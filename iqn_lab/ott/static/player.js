// IQN lab player: Media Source Extensions fed with one-second segments over HTTP/3
// from the media host, keeping only a few seconds buffered (like YouTube), so a
// bottleneck becomes a stall within seconds. Contract: docs/page-contract.md.
// With ?clip=URL it plays that file in a loop instead (the user-agent tests' page).
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const AHEAD = Number(params.get("buffer") || 4); // seconds kept buffered ahead
  const KEEP_BEHIND = 10; // seconds kept behind the play head before pruning
  const CLIP = params.get("clip");
  const AUTOHIDE = Number(params.get("autohide") ?? 3000); // ms of playback before the controls fade (0: never)
  const player = document.getElementById("movie_player");
  const video = player.querySelector("video");
  const spinner = player.querySelector(".ytp-spinner");
  // the autoplay switch, twice: in the player's control bar (YouTube's, profile
  // "youtube") and below the player (the lab's original, profile "lab"); one state
  const SWITCHES = '[data-tooltip-target-id="ytp-autonav-toggle-button"], #autoplay-toggle';
  const state = {
    stalls: [], clicks: [], segments: 0, bytes: 0, autoplayPosts: 0, autoplayOk: 0, errors: [],
    autoplay: true, ads: [],
  };
  window.iqnPlayer = state;

  // Spinner: shown exactly while the video waits; every shown interval is a stall.
  function showSpinner() {
    if (spinner.style.display === "block" && state.stalls.length) return;
    spinner.style.display = "block";
    state.stalls.push([Date.now(), null]);
  }
  function hideSpinner() {
    if (spinner.style.display !== "block") return;
    spinner.style.display = "none";
    const last = state.stalls[state.stalls.length - 1];
    if (last && last[1] === null) last[1] = Date.now();
  }
  showSpinner(); // the page starts waiting for its first frames
  video.addEventListener("waiting", showSpinner);
  video.addEventListener("stalled", showSpinner);
  video.addEventListener("playing", hideSpinner);
  video.addEventListener("canplay", () => { if (!video.paused) hideSpinner(); });

  // Controls fade out AUTOHIDE ms after the pointer last moved over the player,
  // unless the user paused (a paused player keeps them, as YouTube's does); a
  // pointer move over the player shows them at once; leaving it hides them soon.
  let hideTimer = null;
  function hideLater(ms) {
    clearTimeout(hideTimer);
    if (AUTOHIDE > 0) hideTimer = setTimeout(() => {
      const userPaused = video.paused && spinner.style.display !== "block";
      if (!userPaused) player.classList.add("ytp-autohide");
    }, ms);
  }
  player.addEventListener("mousemove", () => { player.classList.remove("ytp-autohide"); hideLater(AUTOHIDE); });
  player.addEventListener("mouseleave", () => hideLater(250));
  video.addEventListener("playing", () => hideLater(AUTOHIDE));
  video.addEventListener("pause", () => {
    if (spinner.style.display === "block") return; // waiting, not the user's pause
    clearTimeout(hideTimer);
    player.classList.remove("ytp-autohide");
  });

  // Autoplay switch: each click flips it and tells the service (POST, 200 OK).
  function render() {
    const on = state.autoplay ? "true" : "false";
    for (const el of document.querySelectorAll(".ytp-autonav-toggle-button, #autoplay-toggle")) {
      el.setAttribute("aria-checked", on);
    }
    for (const el of document.querySelectorAll('[data-tooltip-target-id="ytp-autonav-toggle-button"]')) {
      const label = "Autoplay is " + (state.autoplay ? "on" : "off");
      el.setAttribute("aria-label", label); // no title: a native tooltip would cover the picture
    }
  }
  document.addEventListener("click", (ev) => {
    if (!(ev.target instanceof Element) || !ev.target.closest(SWITCHES)) return;
    state.clicks.push(performance.timeOrigin + ev.timeStamp); // epoch ms of each click
    const on = (state.autoplay = !state.autoplay);
    render();
    state.autoplayPosts++;
    fetch("/api/autoplay", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ autoplay: on }),
    }).then((r) => { if (r.ok) state.autoplayOk++; return r.arrayBuffer(); })
      .catch((e) => state.errors.push(String(e)));
  });
  state.render = render;

  // An ad break: the player carries YouTube's ad-showing class for ms.
  state.ad = (ms) => {
    player.classList.add("ad-showing");
    state.ads.push([Date.now(), null]);
    setTimeout(() => {
      player.classList.remove("ad-showing");
      state.ads[state.ads.length - 1][1] = Date.now();
    }, ms);
  };

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  function ahead() {
    const b = video.buffered;
    for (let i = 0; i < b.length; i++) {
      if (b.start(i) <= video.currentTime + 0.1 && video.currentTime < b.end(i)) return b.end(i) - video.currentTime;
    }
    return 0;
  }
  function append(sb, data) {
    return new Promise((resolve, reject) => {
      sb.addEventListener("updateend", resolve, { once: true });
      sb.addEventListener("error", reject, { once: true });
      sb.appendBuffer(data);
    });
  }
  function remove(sb, end) {
    return new Promise((resolve) => {
      sb.addEventListener("updateend", resolve, { once: true });
      sb.remove(0, end);
    });
  }
  async function get(url) {
    for (;;) {
      try {
        const r = await fetch(url, { cache: "no-store" });
        if (r.ok) return new Uint8Array(await r.arrayBuffer());
        state.errors.push(url + ": " + r.status);
      } catch (e) {
        state.errors.push(url + ": " + e);
      }
      await sleep(500);
    }
  }

  async function start() {
    const meta = await (await fetch("/media.json")).json();
    state.meta = meta;
    const ms = new MediaSource();
    video.src = URL.createObjectURL(ms);
    await new Promise((r) => ms.addEventListener("sourceopen", r, { once: true }));
    const sb = ms.addSourceBuffer(meta.mime);
    await append(sb, await get(meta.base + "init.m4s"));
    // The clip loops forever: each pass is shifted by its duration.
    for (let pass = 0; ; pass++) {
      for (let n = 1; n <= meta.segments; n++) {
        while (ahead() >= AHEAD) await sleep(100);
        const data = await get(meta.base + "seg-" + n + ".m4s");
        sb.timestampOffset = pass * meta.duration;
        await append(sb, data);
        state.segments++;
        state.bytes += data.length;
        if (video.paused && video.autoplay) video.play().catch(() => {});
        if (video.currentTime > KEEP_BEHIND + 1) await remove(sb, video.currentTime - KEEP_BEHIND);
      }
    }
  }
  if (CLIP) {
    video.loop = true;
    video.src = CLIP;
  } else {
    start().catch((e) => state.errors.push("player: " + e));
  }
})();
