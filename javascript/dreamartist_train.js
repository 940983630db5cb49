// DreamArtist tab: start a training job with a task id and follow it with the WebUI's own progress polling
// (progress bar, live preview, textinfo), like javascript/textualInversion.js does for the built-in trainer.

function dreamartist_start_training() {
    var live = gradioApp().querySelector('#dreamartist_progress .dreamartist-live');
    var status = gradioApp().getElementById('dreamartist_status');
    var id = randomId();

    // the previous run's summary stays readable but dimmed until this run's result replaces it
    if (status) status.classList.add('dreamartist-stale');

    requestProgress(id, gradioApp().getElementById('dreamartist_progress'), gradioApp().getElementById('dreamartist_gallery'), function() {
        if (live) live.innerHTML = '';
        if (status) status.classList.remove('dreamartist-stale');
    }, function(progress) {
        if (live) live.innerHTML = progress.textinfo || '';
    });

    var args = Array.from(arguments);
    args[0] = id;
    return args;
}

// Train waits for the reference images: while gradio still uploads a dropped file, the value it would send holds
// no bytes yet (the server would see an empty file), so the button is disabled and says why until it has arrived.
function dreamartist_uploads_pending() {
    var uploads = gradioApp().getElementById('dreamartist_uploads');
    if (!uploads) return false;
    if (uploads.querySelector('.wrap.generating')) return true;
    // a listed file without its download link has not arrived yet (gradio shows "Uploading..." there)
    return Array.from(uploads.querySelectorAll('tr.file td.download')).some(function(cell) {
        return !cell.querySelector('a');
    });
}

// gradio 3.41 drops the answer to an upload when any other event of the page finishes while the upload is in
// flight: the file then shows "Uploading..." for ever. That is told apart from a slow upload by the browser's own
// record of the request: its answer came back (a resource timing entry for /upload) and the file is still pending.
var dreamartist_pending_since = null;
var dreamartist_upload_answers = [];  // responseEnd of each /upload request (an observer: the timeline buffer fills)

new PerformanceObserver(function(list) {
    list.getEntries().forEach(function(entry) {
        if (/\/upload(\?|$)/.test(entry.name)) dreamartist_upload_answers.push(entry.responseEnd);
    });
}).observe({ type: 'resource' });

function dreamartist_upload_lost() {
    if (dreamartist_pending_since === null) return false;
    var now = performance.now();
    return dreamartist_upload_answers.some(function(answered) {
        return answered >= dreamartist_pending_since && now - answered > 2000;
    });
}

function dreamartist_update_train_button() {
    var train = gradioApp().getElementById('dreamartist_train');
    if (!train) return;
    var pending = dreamartist_uploads_pending();
    if (!pending) {
        dreamartist_pending_since = null;
        dreamartist_upload_answers = [];
    }
    else if (dreamartist_pending_since === null) dreamartist_pending_since = performance.now();
    var lost = pending && dreamartist_upload_lost();
    if (train.disabled !== pending) train.disabled = pending;
    train.classList.toggle('dreamartist-waiting', pending && !lost);
    train.classList.toggle('dreamartist-upload-lost', lost);
    train.title = lost ? 'The upload was lost: remove the image (x) and add it again' :
        pending ? 'Waiting for the reference images to finish uploading' : '';
}

// onUiUpdate runs on the mutation itself (onAfterUiUpdate is debounced and would leave a click window open); a lost
// upload changes nothing on the page, so while something is pending the button is also checked every second
onUiUpdate(dreamartist_update_train_button);
setInterval(function() {
    if (dreamartist_pending_since !== null) dreamartist_update_train_button();
}, 1000);
