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
