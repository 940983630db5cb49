// Drives the DreamArtist tab of a running WebUI in headless Chromium; called by tests/integration/test_ui_browser.py.
//
//   node drive_tab.js '<json>'   with {url, image, outputDir, name, interruptName, pairName, userDataDir, chromium,
//                                       steps, size, previewEvery, timeoutMs, onlyTrain, shotPrefix}
//
// onlyTrain: the training run alone (no reload, create, interrupt); shotPrefix names its screenshots.
//
// Prints one JSON line with what it saw (progress texts, statuses, gallery/plot, page errors); the Python
// test makes the assertions. Screenshots: <outputDir>/dreamartist-{before,progress,after,reloaded}.png.

'use strict';

const path = require('path');
const { startSeen, drive } = require('./session');

const options = JSON.parse(process.argv[2]);
const seen = startSeen('drive_tab');
seen.progressTexts = [];

const note = seen.note;

async function shot(page, label, fullPage = true) {
    const file = path.join(options.outputDir, `${options.shotPrefix || 'dreamartist'}-${label}.png`);
    await page.screenshot({ path: file, fullPage });
    note(`screenshot ${file}`);
}

async function openTab(page) {
    await page.waitForSelector('#tabs > .tab-nav > button', { timeout: 120000 });
    await page.locator('#tabs > .tab-nav > button', { hasText: /^\s*Train\s*$/ }).click();
    await page.locator('#train_tabs > .tab-nav > button', { hasText: 'DreamArtist' }).click();
    await page.waitForSelector('#dreamartist_tab', { state: 'visible' });
    note('DreamArtist tab open');
}

async function fill(page, selector, value) {
    const field = page.locator(`${selector} textarea, ${selector} input[type=number], ${selector} input[type=text]`).first();
    await field.fill(String(value));
    await field.press('Tab');  // commit (gradio reads number fields on blur)
}

async function openAccordion(page, id) {
    const accordion = page.locator(`#${id}`);
    if (await accordion.locator('.label-wrap.open').count() === 0) {
        await accordion.locator('.label-wrap').first().click();
    }
}

async function liveText(page) {
    return (await page.locator('#dreamartist_progress .dreamartist-live').innerText()).trim();
}

async function uploadFinished(page) {
    // gradio lists a chosen file at once ("Uploading..."); it has arrived when its row links to the server's copy
    await page.locator('#dreamartist_uploads tr.file td.download a').first().waitFor({ timeout: 60000 });
    await page.waitForFunction(() => !document.querySelector('#dreamartist_train').disabled, null, { timeout: 60000 });
}

async function uploadWhileTrainIsPressed(page) {
    // Train must be disabled while the image uploads (a click then would send an image with no bytes yet) and come
    // back once it has arrived. Every change of the button is recorded as it happens, so the upload is not held back:
    // gradio 3.41 drops an upload's answer now and then when it is held for seconds (seen in about 1 of 6 runs).
    await page.evaluate(() => {
        const train = document.querySelector('#dreamartist_train');
        window.dreamartistTrainStates = [];
        new MutationObserver(() => {
            const states = window.dreamartistTrainStates;
            if (states.length && states[states.length - 1].disabled === train.disabled) return;
            states.push({ disabled: train.disabled, label: getComputedStyle(train, '::after').content });
        }).observe(train, { attributes: true });
    });
    await page.locator('#dreamartist_uploads input[type=file]').setInputFiles(options.image);
    await uploadFinished(page);
    seen.trainStatesDuringUpload = await page.evaluate(() => window.dreamartistTrainStates);
    note('image uploaded (Train was disabled while it uploaded)');
}

async function train(page) {
    await fill(page, '#dreamartist_name', options.name);
    await uploadWhileTrainIsPressed(page);
    await fill(page, '#dreamartist_width', options.size);
    await fill(page, '#dreamartist_height', options.size);
    await fill(page, '#dreamartist_steps', options.steps);
    await openAccordion(page, 'dreamartist_preview_accordion');
    await fill(page, '#dreamartist_preview_every', options.previewEvery);
    await fill(page, '#dreamartist_preview_steps', 4);
    await shot(page, 'before');

    const before = await statusText(page);
    await page.locator('#dreamartist_train').click();
    note('Train clicked');
    const deadline = Date.now() + options.timeoutMs;
    seen.livePreview = false;
    while (Date.now() < deadline) {
        const text = await liveText(page);
        if (text && seen.progressTexts[seen.progressTexts.length - 1] !== text) {
            seen.progressTexts.push(text);
        }
        // the host's live preview (shared.state.assign_current_image) over our gallery, after the first preview
        if (!seen.livePreview && await page.locator('#dreamartist_gallery .livePreview img').count() > 0) {
            seen.livePreview = true;
            await shot(page, 'progress');
        }
        if (await page.evaluate(statusReplaced, before)) break;
        await page.waitForTimeout(200);
    }
    // the host removes its progress bar (and the live preview over the gallery) once the task is reported done
    seen.status = await waitForSummary(page, before, 120000);
    await page.locator('#dreamartist_gallery img').first().waitFor({ timeout: 30000 }).catch(() => {});
    await page.locator('#dreamartist_loss_plot img').first().waitFor({ timeout: 30000 }).catch(() => {});
    seen.galleryImages = await page.locator('#dreamartist_gallery .thumbnail-item img, #dreamartist_gallery .grid-wrap img').count();
    seen.lossPlotShown = await page.locator('#dreamartist_loss_plot img').count() > 0;
    seen.files = await page.locator('#dreamartist_files textarea').inputValue();
    await shot(page, 'after');
    // the run's checkpoints are offered for resuming
    await openAccordion(page, 'dreamartist_resume_accordion');
    await page.locator('#dreamartist_checkpoint input').click();
    seen.checkpointChoices = await page.locator('#dreamartist_checkpoint ul li').allInnerTexts();
    await page.keyboard.press('Escape');
}

async function statusText(page) {
    return (await page.locator('#dreamartist_status').first().innerText()).trim();
}

function statusReplaced(before) {
    // this run's summary or error is shown: not the previous one (kept, dimmed, while a run goes on)
    const status = document.getElementById('dreamartist_status');
    return Boolean(status && status.querySelector('.dreamartist-summary, .error') &&
        !status.classList.contains('dreamartist-stale') && status.innerText.trim() !== before);
}

async function waitForSummary(page, before, timeoutMs) {
    await page.waitForFunction(statusReplaced, before, { timeout: timeoutMs });
    await page.locator('#dreamartist_results .progressDiv').waitFor({ state: 'detached', timeout: 120000 });
    return statusText(page);
}

async function createPair(page) {
    // "Create pair" writes the untrained pair; a second click without "Overwrite" must be refused in the tab
    await fill(page, '#dreamartist_name', options.pairName);
    await openAccordion(page, 'dreamartist_pair_accordion');
    const status = page.locator('#dreamartist_status').first();
    await page.locator('#dreamartist_create_pair').click();
    await page.locator('#dreamartist_status .dreamartist-summary', { hasText: 'Created' }).first().waitFor({ timeout: 60000 });
    seen.createStatus = (await status.innerText()).trim();
    await page.locator('#dreamartist_create_pair').click();
    await page.locator('#dreamartist_status .error').first().waitFor({ timeout: 60000 });
    seen.createAgainStatus = (await status.innerText()).trim();
    note('pair created');
}

function countCompletedEvents(page) {
    // gradio 3.41 answers every event on its queue websocket; "process_completed" ends one
    const counter = { completed: 0 };
    page.on('websocket', socket => socket.on('framereceived', frame => {
        if (String(frame.payload).includes('"process_completed"')) counter.completed += 1;
    }));
    return counter;
}

async function loseAnUpload(page) {
    // gradio 3.41 drops an upload's answer when another event of the page finishes meanwhile (here the checkpoint
    // list's refresh, answered while the upload is held back): the tab must say so instead of waiting for ever
    let release, passed;
    const held = new Promise(resolve => { release = resolve; });
    const answered = new Promise(resolve => { passed = resolve; });
    await page.route('**/upload', async route => { await held; await route.continue(); passed(); });
    await page.locator('#dreamartist_uploads input[type=file]').setInputFiles(options.image);
    await openAccordion(page, 'dreamartist_resume_accordion');
    const before = events.completed;
    await page.locator('#dreamartist_checkpoint_refresh').click();
    for (const deadline = Date.now() + 60000; events.completed === before; await page.waitForTimeout(50)) {
        if (Date.now() > deadline) throw new Error('the checkpoint refresh was never answered');
    }
    release();
    await answered;
    await page.unroute('**/upload');
    const train = page.locator('#dreamartist_train.dreamartist-upload-lost');
    await train.waitFor({ state: 'attached', timeout: 30000 });
    seen.lostUpload = await page.evaluate(() => {
        const button = document.querySelector('#dreamartist_train');
        return { disabled: button.disabled, label: getComputedStyle(button, '::after').content };
    });
    await shot(page, 'upload-lost', false);
    await page.locator('#dreamartist_uploads button[aria-label="Clear"]').click();
    await page.waitForFunction(() => !document.querySelector('#dreamartist_train').disabled, null, { timeout: 30000 });
    note('lost upload reported, cleared');
}

async function interruptRun(page) {
    // a long job, stopped with the tab's Interrupt button once it reports its first step; its image is added
    // again after a lost upload
    await fill(page, '#dreamartist_name', options.interruptName);
    await loseAnUpload(page);
    await page.locator('#dreamartist_uploads input[type=file]').setInputFiles(options.image);
    await uploadFinished(page);
    await fill(page, '#dreamartist_width', options.size);
    await fill(page, '#dreamartist_height', options.size);
    await fill(page, '#dreamartist_steps', 1000);
    await openAccordion(page, 'dreamartist_preview_accordion');
    await fill(page, '#dreamartist_preview_every', 0);
    const before = await statusText(page);
    await page.locator('#dreamartist_train').click();
    await page.locator('#dreamartist_progress .dreamartist-live', { hasText: /step [1-9]/i })
        .waitFor({ timeout: options.timeoutMs });
    await page.locator('#dreamartist_interrupt').click();
    note('Interrupt clicked');
    seen.interruptStatus = await waitForSummary(page, before, options.timeoutMs);
}

function formValues() {
    // what each field of the tab shows: {elem_id: value} for text, number/slider and checkbox fields
    const values = {};
    for (const block of document.querySelectorAll('#dreamartist_tab .block[id^="dreamartist_"]')) {
        const input = block.querySelector('input[type=checkbox], input[type=number], textarea, input[type=text]');
        if (!input || block.classList.contains('gradio-dropdown')) continue;
        values[block.id] = input.type === 'checkbox' ? input.checked : input.value;
    }
    return values;
}

function overflowing() {
    // our elements whose box sticks out of the tab sideways (a layout bug)
    const tab = document.getElementById('dreamartist_tab').getBoundingClientRect();
    return [...document.querySelectorAll('#dreamartist_tab [id^="dreamartist_"]')]
        .filter(e => e.offsetParent !== null)
        .filter(e => { const r = e.getBoundingClientRect(); return r.left < tab.left - 1 || r.right > tab.right + 1; })
        .map(e => e.id);
}

async function reloadUi(page) {
    // Settings > "Reload UI" restarts the gradio app in the same process (script modules reloaded).
    await page.locator('#tabs > .tab-nav > button', { hasText: /^\s*Settings\s*$/ }).click();
    await page.locator('#settings_restart_gradio').click();
    note('Reload UI clicked');
    await page.waitForSelector('text=Reloading...', { timeout: 10000 }).catch(() => {});
    await page.waitForLoadState('load');
    await page.waitForSelector('#tabs > .tab-nav > button', { timeout: 180000 });
    await openTab(page);
    // A bad input must come back as a message in the tab: train without any image.
    await fill(page, '#dreamartist_name', options.name);
    await page.locator('#dreamartist_train').click();
    const error = page.locator('#dreamartist_status .error');
    await error.waitFor({ timeout: 60000 });
    seen.errorAfterReload = (await error.innerText()).trim();
    await createPair(page);
    await interruptRun(page);
    for (const id of await page.locator('#dreamartist_tab .gradio-accordion').evaluateAll(nodes => nodes.map(n => n.id))) {
        await openAccordion(page, id);  // every option on one screenshot
    }
    seen.overflowing = await page.evaluate(overflowing);
    await shot(page, 'reloaded');
}

let events;

drive(options, seen, async page => {
    events = countCompletedEvents(page);
    await openTab(page);
    seen.initialValues = await page.evaluate(formValues);
    await train(page);
    if (!options.onlyTrain) await reloadUi(page);
});
