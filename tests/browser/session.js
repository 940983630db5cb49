// What every driver of tests/browser shares: one headless Debian Chromium page on the WebUI, console and page
// errors collected, and one JSON line of observations printed at the end (with "failure" when a step threw).
'use strict';

const { chromium } = require('playwright-core');

function startSeen(label) {
    const seen = { consoleErrors: [], pageErrors: [], steps: [] };
    seen.note = step => {
        seen.steps.push(step);
        process.stderr.write(`[${label}] ${step}\n`);
    };
    return seen;
}

async function drive(options, seen, run) {
    const context = await chromium.launchPersistentContext(options.userDataDir, {
        executablePath: options.chromium,
        headless: true,
        viewport: { width: 1600, height: 1000 },
        args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
               '--disable-component-update', '--disable-sync'],
    });
    let exitCode = 0;
    try {
        const page = context.pages()[0] || await context.newPage();
        page.on('console', message => { if (message.type() === 'error') seen.consoleErrors.push(message.text()); });
        page.on('pageerror', error => seen.pageErrors.push(String(error)));
        await page.goto(options.url, { waitUntil: 'load', timeout: 120000 });
        await run(page);
    } catch (error) {
        seen.failure = String(error && error.stack || error);
        exitCode = 1;
    } finally {
        await context.close();
    }
    process.stdout.write(JSON.stringify(seen) + '\n');
    process.exit(exitCode);
}

module.exports = { startSeen, drive };
