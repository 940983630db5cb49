// Drives the txt2img prompts of a running WebUI in headless Chromium: the prompt JavaScript of DreamArtist
// (javascript/dreamartist_prompts.js) and the extra-networks cards of learned concepts (dreamartist_ext/webui/cards.py).
// Called by tests/integration/test_prompts_browser.py:
//
//   node drive_prompts.js '<json>'   with {url, concept, plainConcept, plainEmbedding, userDataDir, chromium,
//                                           outputDir}
//
// Prints one JSON line with what it saw (prompt texts after each action, the card names); the Python test makes
// the assertions. Screenshot: <outputDir>/dreamartist-cards.png.

'use strict';

const path = require('path');
const { startSeen, drive } = require('./session');

const options = JSON.parse(process.argv[2]);
const seen = startSeen('drive_prompts');
const PROMPT = '#txt2img_prompt textarea';
const NEGATIVE = '#txt2img_neg_prompt textarea';

const note = seen.note;

async function prompts(page) {
    // the host's card click joins with ", " and may leave a leading space: compare the words
    const value = async selector => (await page.locator(selector).inputValue()).trim();
    return { prompt: await value(PROMPT), negative: await value(NEGATIVE) };
}

async function clearPrompts(page) {
    for (const selector of [PROMPT, NEGATIVE]) {
        await page.locator(selector).fill('');
    }
}

async function typeInto(page, selector, text) {
    await page.locator(selector).click();
    await page.keyboard.type(text, { delay: 10 });  // trusted key events, as a person types
}

async function negativeSettles(page) {
    // the prompt script waits 400 ms after the last keystroke, then asks the server for the learned words once
    let last = null;
    for (let i = 0; i < 20; i++) {
        await page.waitForTimeout(250);
        const now = await page.locator(NEGATIVE).inputValue();
        if (now === last && i >= 8) return now;
        last = now;
    }
    return last;
}

async function openExtraTab(page, label) {
    await page.locator('#txt2img_extra_tabs > .tab-nav > button', { hasText: label }).click();
    const cards = `#txt2img_${label.toLowerCase().replace(/ /g, '_')}_cards`;
    await page.locator(cards).waitFor({ state: 'visible', timeout: 30000 });
    return cards;
}

async function cardNames(page, cards) {
    return page.locator(`${cards} .card`).evaluateAll(nodes => nodes.map(n => n.dataset.name));
}

async function typing(page) {
    // typing the learned word adds its partner to the negative prompt
    await typeInto(page, PROMPT, `a photo of ${options.concept}`);
    // the real state first (the partner arrives), then no second change
    await page.waitForFunction(selector => document.querySelector(selector).value !== '', NEGATIVE,
                               { timeout: 15000 }).catch(() => {});
    seen.afterTyping = { prompt: await page.locator(PROMPT).inputValue(), negative: await negativeSettles(page) };
    // a partner the user deletes stays deleted while the word stays in the prompt
    await page.locator(NEGATIVE).fill('blurry');
    await typeInto(page, PROMPT, ', oil painting');
    seen.afterDeletingPartner = { prompt: await page.locator(PROMPT).inputValue(), negative: await negativeSettles(page) };
    // a word that only starts like a learned one is not it
    await clearPrompts(page);
    await typeInto(page, PROMPT, `${options.concept}x on a beach`);
    seen.afterLookalike = { prompt: await page.locator(PROMPT).inputValue(), negative: await negativeSettles(page) };
    // with "Add name-neg ..." off a hint offers the partner instead; clicking it adds it
    await clearPrompts(page);
    await page.locator('#txt2img_dreamartist .label-wrap').first().click();
    await page.locator('#txt2img_dreamartist_auto_negative input[type=checkbox]').uncheck();
    await typeInto(page, PROMPT, `${options.plainConcept} in the snow`);
    await negativeSettles(page);
    const hint = page.locator('#txt2img_dreamartist_hint');
    await hint.waitFor({ state: 'visible', timeout: 10000 });
    seen.hintText = (await hint.innerText()).trim();
    seen.negativeBeforeHint = await page.locator(NEGATIVE).inputValue();
    await hint.click();
    seen.afterHint = await prompts(page);
    await page.locator('#txt2img_dreamartist_auto_negative input[type=checkbox]').check();
    await clearPrompts(page);
    note('typing checked');
}

async function cards(page) {
    const tiCards = await openExtraTab(page, 'Textual Inversion');
    seen.textualInversionCards = await cardNames(page, tiCards);
    // the concept's card: name to the prompt, name-neg to the negative prompt; a second click takes both back
    await page.locator(`${tiCards} .card[data-name="${options.concept}"]`).click();
    seen.afterConceptCard = await prompts(page);
    await page.screenshot({ path: path.join(options.outputDir, 'dreamartist-cards.png'), fullPage: false });
    await page.locator(`${tiCards} .card[data-name="${options.concept}"]`).click();
    seen.afterSecondClick = await prompts(page);
    // an ordinary embedding's card is the host's own: its word only, into the prompt
    await clearPrompts(page);
    await page.locator(PROMPT).click();  // the host puts an ordinary embedding into the last focused prompt
    await page.locator(`${tiCards} .card[data-name="${options.plainEmbedding}"]`).click();
    seen.afterPlainEmbeddingCard = await prompts(page);
    await clearPrompts(page);
    const loraCards = await openExtraTab(page, 'Lora');
    seen.loraCards = await cardNames(page, loraCards);
    note('cards checked');
}

drive(options, seen, async page => {
    await page.locator(PROMPT).waitFor({ timeout: 120000 });
    note('page loaded');
    await typing(page);
    await cards(page);
});
