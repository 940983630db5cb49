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

// onUiUpdate runs on the mutation itself (onAfterUiUpdate is debounced and would leave a click window open)
onUiUpdate(function() {
    var train = gradioApp().getElementById('dreamartist_train');
    if (!train) return;
    var pending = dreamartist_uploads_pending();
    if (train.disabled !== pending) {
        train.disabled = pending;
        train.classList.toggle('dreamartist-waiting', pending);
        train.title = pending ? 'Waiting for the reference images to finish uploading' : '';
    }
});
