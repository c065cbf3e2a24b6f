// Test hooks on top of the lab's player page (iqn_lab/ott/static), what a user
// does to a YouTube player, and a record of it in window.iqnPlayer next to the
// lab player's own (stalls, clicks, autoplayPosts, autoplayOk, errors):
// - iqnTest.stall(ms): the picture freezes and the spinner turns, as when the
//   buffer runs dry, for ms (0: until iqnTest.resume());
// - a click on the picture pauses or resumes it, with the bezel animating in
//   the centre (iqnPlayer.paused: [epochMs, paused]);
// - a click on the progress bar seeks there and rebuffers for
//   iqnTest.seekRebufferMs (iqnPlayer.seeks: [epochMs, fraction]);
// - every click on the player (iqnPlayer.playerClicks: epochMs) and fullscreen
//   change (iqnPlayer.fullscreen: [epochMs, entered]) is recorded;
// - iqnTest.dropClicks(k): the next k clicks on an autoplay switch are lost
//   (never reach the page), as a busy page may lose one (iqnPlayer.dropped);
// - iqnTest.navigate(): a new video, as YouTube's in-page navigation: a new
//   address, a new switch element one button further left, and
//   yt-navigate-finish (iqnPlayer.navigations);
// - clicks on the control bar (.ytp-chrome-bottom) are the controls', not a pause.
"use strict";
(function () {
  const player = document.getElementById("movie_player");
  const video = player.querySelector("video");
  const bezel = player.querySelector(".ytp-bezel");
  const progress = player.querySelector(".ytp-progress-bar");
  const state = window.iqnPlayer;
  Object.assign(state, { playerClicks: [], seeks: [], fullscreen: [], paused: [], dropped: [], navigations: [] });

  let drop = 0;
  document.addEventListener("click", (ev) => {
    const sw = ev.target instanceof Element && ev.target.closest(
      '[data-tooltip-target-id="ytp-autonav-toggle-button"], #autoplay-toggle');
    if (sw && drop > 0) {
      drop--;
      state.dropped.push(Date.now());
      ev.stopPropagation(); // capture phase, on the document: the page never sees it
    }
  }, true);
  function navigate() {
    const n = state.navigations.length + 1;
    const url = new URL(location.href);
    url.searchParams.set("v", "video" + n);
    history.pushState({}, "", url);
    const old = player.querySelector('[data-tooltip-target-id="ytp-autonav-toggle-button"]');
    const fresh = old.cloneNode(true);
    const other = document.createElement("button");
    other.className = "ytp-button ytp-settings-button";
    other.setAttribute("aria-label", "Settings");
    old.replaceWith(fresh, other); // a new switch element, one button (60 px) further left
    state.render();
    state.navigations.push([Date.now(), location.href]);
    document.dispatchEvent(new Event("yt-navigate-finish"));
  }

  let stallTimer = null;
  function stall(ms) {
    clearTimeout(stallTimer);
    video.pause();
    video.dispatchEvent(new Event("waiting")); // the player shows its spinner
    stallTimer = ms ? setTimeout(resume, ms) : null;
  }
  function resume() {
    clearTimeout(stallTimer);
    stallTimer = null;
    video.play(); // its "playing" event hides the spinner
  }

  // The user's own clicks on the player (a click the agent must never make).
  player.addEventListener("click", (ev) => {
    if (ev.target !== progress && ev.target.closest(".ytp-chrome-bottom")) return; // a control, not the picture
    state.playerClicks.push(Date.now());
    if (ev.target === progress) {
      const f = Math.min(1, Math.max(0, ev.offsetX / progress.clientWidth));
      state.seeks.push([Date.now(), f]);
      video.currentTime = f * (video.duration || 0);
      stall(window.iqnTest.seekRebufferMs);
      return;
    }
    if (video.paused) video.play(); else video.pause();
    state.paused.push([Date.now(), video.paused]);
    bezel.classList.remove("show");
    void bezel.offsetWidth; // restart the animation
    bezel.classList.add("show");
  });
  document.addEventListener("fullscreenchange", () => {
    state.fullscreen.push([Date.now(), !!document.fullscreenElement]);
  });

  window.iqnTest = {
    stall, resume, navigate,
    dropClicks: (k) => { drop = k; },
    seekRebufferMs: 600,
    playing: () => !video.paused && video.readyState >= 3 && video.currentTime > 0,
  };
})();
