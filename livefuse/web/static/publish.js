// The publisher page: camera -> WHIP sendrecv -> the swapped video back, with live settings.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { source: null, pc: null, camera: null, resource: null, session: null, timer: null };
  window.livefuseState = state; // for the browser test and the curious: the live peer connection

  function say(text, kind) {
    const box = $("message");
    box.textContent = text || "";
    box.hidden = !text;
    box.className = kind || "error";
  }

  function problem(error) {
    if (error instanceof LiveFuse.ApiProblem) {
      if (error.status === 401) $("token-row").hidden = false;
      return error.message;
    }
    return error && error.message ? error.message : String(error);
  }

  function cameraProblem(error) {
    switch (error && error.name) {
      case "NotAllowedError":
        return "The browser did not allow the camera. Allow camera access for this page (the icon in the address bar) and press Start again.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No camera was found. Connect a camera and press Start again.";
      case "NotReadableError":
        return "The camera is in use by another application. Close it and press Start again.";
      case "SecurityError":
        return "The browser allows the camera only on https:// or on this machine (http://127.0.0.1).";
      default:
        return "The camera could not be started: " + (error && error.message ? error.message : error);
    }
  }

  // -- the source face ------------------------------------------------------------------

  $("source-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    $("source-state").textContent = "finding the face…";
    say("");
    try {
      const response = await LiveFuse.api("POST", "/api/v1/sources", file, file.type || "application/octet-stream");
      const source = await response.json();
      const extra = source.faces.length > 1 ? ` (${source.faces.length} faces; using the largest)` : "";
      addPick(source.id, URL.createObjectURL(file), file.name);
      await choose(source.id);
      $("source-state").textContent = "face ready" + extra;
    } catch (error) {
      $("source-state").textContent = "";
      say(problem(error));
    }
  });

  // Faces uploaded on this page stay one click away: picking one switches it live.
  function addPick(id, url, name) {
    const pick = document.createElement("button");
    pick.className = "pick";
    pick.dataset.source = id;
    pick.title = "wear " + name;
    const img = document.createElement("img");
    img.src = url;
    img.alt = name;
    pick.append(img);
    pick.addEventListener("click", () => choose(id));
    $("sources").append(pick);
  }

  async function choose(id) {
    state.source = id;
    for (const pick of document.querySelectorAll("#sources .pick")) {
      pick.classList.toggle("chosen", pick.dataset.source === id);
    }
    if (state.session) await patch({ source: id });
  }

  // -- live settings (no renegotiation: PATCH the session) --------------------------------

  async function patch(fields) {
    if (!state.session) return;
    try {
      await LiveFuse.api("PATCH", "/api/v1/sessions/" + state.session, JSON.stringify(fields), "application/json");
    } catch (error) {
      say(problem(error));
    }
  }

  $("quality").addEventListener("change", () => patch({ quality: $("quality").value }));
  $("enabled").addEventListener("change", () => patch({ enabled: $("enabled").checked }));
  $("faces").addEventListener("change", () => patch({ faces: $("faces").value }));
  $("token-save").addEventListener("click", () => {
    LiveFuse.setToken($("token").value.trim());
    $("token-row").hidden = true;
    say("Token saved. Choose the photo again, then press Start.", "info");
  });

  // -- start and stop ---------------------------------------------------------------------

  async function start() {
    say("");
    $("start").disabled = true;
    try {
      state.camera = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } },
        audio: false,
      });
    } catch (error) {
      $("start").disabled = false;
      say(cameraProblem(error));
      return;
    }
    $("camera").srcObject = state.camera;
    const pc = await LiveFuse.peerConnection();
    state.pc = pc;
    const [track] = state.camera.getVideoTracks();
    track.contentHint = "motion";
    const transceiver = pc.addTransceiver(track, { direction: "sendrecv", streams: [state.camera] });
    const params = transceiver.sender.getParameters();
    params.encodings = [{ maxBitrate: 4_000_000, maxFramerate: 30 }];
    transceiver.sender.setParameters(params).catch(() => {});
    pc.addEventListener("track", (event) => {
      $("swapped").srcObject = event.streams[0] || new MediaStream([event.track]);
    });
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed") {
        say("The connection to the server failed (a firewall or a network change?). Press Start to try again.");
        stop(false);
      }
    });
    const query = new URLSearchParams({ quality: $("quality").value, faces: $("faces").value });
    if (state.source) query.set("source", state.source);
    try {
      state.resource = await LiveFuse.exchange(pc, "/whip?" + query);
    } catch (error) {
      say(problem(error));
      stop(false);
      return;
    }
    state.session = state.resource.split("/").pop();
    if (!$("enabled").checked) await patch({ enabled: false });
    const watch = new URL(await viewerLink(state.session), location.href).toString();
    $("watch-url").href = watch;
    $("watch-url").textContent = watch;
    $("watch-link").hidden = false;
    $("stop").disabled = false;
    if (!state.source) say("Streaming without a face to wear: choose a photo to start swapping.", "info");
    state.timer = setInterval(showStats, 1000);
  }

  // The server's viewer link carries a view token where it has one, never this page's
  // own token; without one the viewer page asks for a token if the server wants one.
  async function viewerLink(session) {
    try {
      const response = await LiveFuse.api("GET", "/whep/" + encodeURIComponent(session));
      const link = (await response.json()).watch;
      if (link) return link;
    } catch (error) {
      // the plain link below
    }
    return "/watch/" + encodeURIComponent(session);
  }

  async function stop(hangUp = true) {
    clearInterval(state.timer);
    state.timer = null;
    if (hangUp) await LiveFuse.hangUp(state.resource);
    if (state.pc) state.pc.close();
    if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
    Object.assign(state, { pc: null, camera: null, resource: null, session: null });
    $("camera").srcObject = null;
    $("swapped").srcObject = null;
    $("watch-link").hidden = true;
    $("stats").textContent = "";
    $("start").disabled = false;
    $("stop").disabled = true;
  }

  async function showStats() {
    if (!state.session) return;
    try {
      const response = await LiveFuse.api("GET", "/api/v1/sessions/" + state.session);
      const session = await response.json();
      const s = session.stats;
      const errors = Object.entries(s.errors).map(([k, v]) => `${k} ${v}`).join(", ") || "none";
      // Faces are counted whether or not they are swapped: say why none are.
      const swapped = session.source === null ? "no source yet: choose a photo"
        : !session.enabled ? "swapping off" : `swapped ${s.swapped}`;
      $("stats").textContent =
        `fps in ${s.fps_in.toFixed(1)}  out ${s.fps_out.toFixed(1)}\n` +
        `latency p50 ${s.latency_ms.p50.toFixed(0)} ms  p95 ${s.latency_ms.p95.toFixed(0)} ms\n` +
        `quality ${s.quality} (${s.quality_mode})\n` +
        `faces ${s.faces}  ${swapped}\n` +
        `dropped ${s.dropped_frames}  errors ${errors}`;
      $("stats").dataset.swapped = String(s.swapped);
    } catch (error) {
      if (error instanceof LiveFuse.ApiProblem && error.code === "unknown_session") {
        say("The server ended this stream (no video reached it for a while, or it restarted). Press Start to begin again.");
        stop(false);
      }
    }
  }

  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => stop(true));
  window.addEventListener("pagehide", () => LiveFuse.hangUp(state.resource));
  LiveFuse.token();
  if (!window.RTCPeerConnection || !navigator.mediaDevices) {
    say("This browser cannot stream video (no WebRTC). Use a current Chrome, Edge, Firefox or Safari.");
    $("start").disabled = true;
  }
})();
