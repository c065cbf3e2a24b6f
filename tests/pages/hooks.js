// Test hooks on top of the lab's player page (iqn_lab/ott/static): a stall on
// demand - the picture freezes and the spinner turns, as when the buffer runs
// dry - and a check that the clip plays.
"use strict";
(function () {
  const video = document.querySelector("#movie_player video");
  window.iqnTest = {
    stall(ms) {
      video.pause();
      video.dispatchEvent(new Event("waiting")); // the player shows its spinner
      setTimeout(() => { video.play(); }, ms); // "playing" hides it again
    },
    playing: () => !video.paused && video.readyState >= 3 && video.currentTime > 0,
  };
})();
