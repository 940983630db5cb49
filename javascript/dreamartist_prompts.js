// DreamArtist in the txt2img/img2img prompts: when a learned word is typed into the prompt, its "-neg" partner
// goes into the negative prompt - or, with the "Add name-neg ..." option of the DreamArtist section off, a small
// clickable hint under the negative prompt offers it. The learned words come from ./dreamartist/prompt-words.
// Words are matched like the server's plain-text rules (dreamartist_ext/prompt_words.py), simplified: prompt
// syntax characters separate words; lower-cased CLIP pieces (letter runs, single digits, symbol runs) are
// compared, longest word first, so "mycat-neg" never counts as "mycat". At generation the server decides.

(function() {
    var TABS = ["txt2img", "img2img"];
    var REFRESH_MS = 10000;
    var learned = [];  // [{name, negative, adapters}]
    var lastFetch = 0;
    var handledNames = {txt2img: {}, img2img: {}};  // names seen in each prompt, so a deleted -neg stays deleted
    var typedValue = {txt2img: null, img2img: null};  // each prompt as the user's last keystroke left it

    function refreshLearned(then) {
        var now = Date.now();
        if (now - lastFetch < REFRESH_MS) {
            if (then) then();
            return;
        }
        lastFetch = now;
        var xhr = new XMLHttpRequest();
        xhr.open("GET", "./dreamartist/prompt-words", true);
        xhr.onreadystatechange = function() {
            if (xhr.readyState !== 4) return;
            if (xhr.status === 200) {
                try {
                    learned = JSON.parse(xhr.responseText).concepts || [];
                } catch (e) {
                    learned = [];
                }
            }
            if (then) then();
        };
        xhr.send();
    }

    function pieces(text) {
        var cleaned = text.toLowerCase().replace(/<\w+:[^>]+>/g, " ").replace(/[()[\]:|\\]/g, " ");
        return cleaned.match(/'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+/gu) || [];
    }

    // The words (of `words`) that `text` uses, longest first at every position.
    function findWords(text, words) {
        var keyed = words.map(function(word) {
            return {word: word, key: pieces(word)};
        }).filter(function(item) {
            return item.key.length > 0;
        }).sort(function(a, b) {
            return b.key.length - a.key.length;
        });
        var seq = pieces(text);
        var found = [];
        var i = 0;
        while (i < seq.length) {
            var matched = null;
            for (var k = 0; k < keyed.length && !matched; k++) {
                var key = keyed[k].key;
                var same = key.length <= seq.length - i;
                for (var j = 0; same && j < key.length; j++) same = seq[i + j] === key[j];
                if (same) matched = keyed[k];
            }
            if (matched) {
                if (found.indexOf(matched.word) < 0) found.push(matched.word);
                i += matched.key.length;
            } else {
                i += 1;
            }
        }
        return found;
    }

    function element(tab, id) {
        return gradioApp().getElementById(tab + "_" + id);
    }

    function checked(tab, id) {
        var box = element(tab, id);
        var input = box && box.querySelector("input[type=checkbox]");
        return input ? input.checked : false;
    }

    function textarea(tab, id) {
        var box = element(tab, id);
        return box ? box.querySelector("textarea") : null;
    }

    function appendWords(negative, words) {
        var text = negative.value.replace(/\s+$/, "");
        var addition = words.join(", ");
        negative.value = text ? text + (/,$/.test(text) ? " " : ", ") + addition : addition;
        updateInput(negative);  // gradio only sees changes that come with an input event
    }

    // Partners the negative prompt lacks for the learned names the prompt uses.
    function missingPartners(prompt, negative) {
        var withPartner = learned.filter(function(c) {
            return c.negative;
        });
        var all = [];
        learned.forEach(function(c) {
            all.push(c.name);
            if (c.negative) all.push(c.negative);
        });
        var used = findWords(prompt, all);
        var present = findWords(negative, withPartner.map(function(c) {
            return c.negative;
        }));
        return withPartner.filter(function(c) {
            return used.indexOf(c.name) >= 0 && present.indexOf(c.negative) < 0;
        });
    }

    function hint(tab) {
        var existing = element(tab, "dreamartist_hint");
        if (existing) return existing;
        var negBox = element(tab, "neg_prompt");
        if (!negBox) return null;
        var div = document.createElement("div");
        div.id = tab + "_dreamartist_hint";
        div.className = "dreamartist-hint";
        div.style.cssText = "display:none; font-size:0.85em; margin:0.25em 0; cursor:pointer; opacity:0.85;";
        negBox.parentElement.insertBefore(div, negBox.nextSibling);
        return div;
    }

    function showHint(tab, missing, negative) {
        var div = hint(tab);
        if (!div) return;
        if (!missing.length) {
            div.style.display = "none";
            return;
        }
        var words = missing.map(function(c) {
            return c.negative;
        });
        div.textContent = "DreamArtist: click to add " + words.join(", ") + " to the negative prompt";
        div.title = "The learned words' negative partners work on the negative branch";
        div.onclick = function() {
            appendWords(negative, words);
            div.style.display = "none";
        };
        div.style.display = "";
    }

    function namesIn(text) {
        var names = {};
        findWords(text, learned.map(function(c) {
            return c.name;
        })).forEach(function(name) {
            names[name] = true;
        });
        return names;
    }

    function update(tab) {
        var prompt = textarea(tab, "prompt");
        var negative = textarea(tab, "neg_prompt");
        if (!prompt || !negative) return;
        if (!learned.length || !checked(tab, "dreamartist_enabled")) {
            showHint(tab, [], negative);
            return;
        }
        var missing = missingPartners(prompt.value, negative.value);
        var inPrompt = namesIn(prompt.value);
        var fresh = missing.filter(function(c) {
            return !handledNames[tab][c.name];
        });
        handledNames[tab] = inPrompt;
        if (checked(tab, "dreamartist_auto_negative")) {
            if (fresh.length) {
                appendWords(negative, fresh.map(function(c) {
                    return c.negative;
                }));
            }
            showHint(tab, [], negative);
        } else {
            showHint(tab, missing, negative);
        }
    }

    function debounced(fn, ms) {
        var timer = null;
        return function() {
            clearTimeout(timer);
            timer = setTimeout(fn, ms);
        };
    }

    onUiLoaded(function() {
        TABS.forEach(function(tab) {
            var prompt = textarea(tab, "prompt");
            var negative = textarea(tab, "neg_prompt");
            if (!prompt || !negative) return;
            var run = debounced(function() {
                refreshLearned(function() {
                    update(tab);
                });
            }, 400);
            // User typing only: a pasted infotext already carries the negative prompt it was made with, so names
            // that arrived by a paste or a "Send to" count as handled.
            prompt.addEventListener("beforeinput", function(event) {
                if (event.isTrusted && prompt.value !== typedValue[tab]) handledNames[tab] = namesIn(prompt.value);
            });
            prompt.addEventListener("input", function(event) {
                if (!event.isTrusted) return;
                typedValue[tab] = prompt.value;
                run();
            });
            negative.addEventListener("input", function(event) {
                if (event.isTrusted) run();
            });
            prompt.addEventListener("focus", function() {
                refreshLearned(null);
            });
        });
        refreshLearned(null);
    });
})();
