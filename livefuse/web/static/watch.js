// The viewer page (/watch/STREAM, STREAM a stream's name or a session's id): the stream
// over WHEP, full-window and muted, fit for an OBS Browser Source. It offers again every
// RETRY_S while nothing is published there yet and whenever the connection drops, so a
// scene can be set up before the stream starts and keeps playing across the publisher's
// restarts. A bar says what is going on (waiting, no face chosen yet, a token wanted) and
// is hidden while all is well.
"use strict";

(() => {
  const RETRY_S = 2;
  const key = decodeURIComponent(location.pathname.replace(/\/+$/, "").split("/").pop());
  const endpoint = "/whep/" + encodeURIComponent(key);
  const $ = (id) => document.getElementById(id);
  let pc = null, resource = null, retry = null, poll = null;
  window.livefuseWatch = { peer: () => pc }; // for the browser test and the curious

  function say(text) {
    $("message").textContent = text || "";
    $("bar").hidden = !text && $("token-form").hidden;
  }

  function waiting() {
    return `Waiting for ${key} to go live…`;
  }

  function later(text, seconds) {
    say(text);
    clearTimeout(retry);
    retry = setTimeout(connect, seconds * 1000);
  }

  function describe(error) {
    return error instanceof LiveFuse.ApiProblem ? error.message : String(error.message || error);
  }

  // -- the access token (also taken from #token=... in the address) -----------------------

  function askForToken(error) {
    stopPolling();
    $("token-form").hidden = false;
    const refused = error.status === 403 || error.message.includes("wrong");
    say(refused
      ? "This access token is not accepted for watching. Enter the viewer token of this server."
      : "This stream needs an access token. Enter it here, or add #token=TOKEN to this page's address.");
    $("token").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    LiveFuse.setToken($("token").value.trim());
    $("token").value = "";
    $("token-form").hidden = true;
    say("Connecting…");
    connect();
  });

  // -- the stream ---------------------------------------------------------------------------

  function hangUpCurrent() {
    stopPolling();
    clearTimeout(retry);
    if (pc) pc.close();
    pc = null;
    LiveFuse.hangUp(resource); // the server's end of a dropped viewer, if it is still there
    resource = null;
  }

  async function connect() {
    hangUpCurrent();
    const peer = await LiveFuse.peerConnection();
    pc = peer;
    peer.addTransceiver("video", { direction: "recvonly" });
    peer.addTransceiver("audio", { direction: "recvonly" });
    const stream = new MediaStream();
    peer.addEventListener("track", (event) => {
      stream.addTrack(event.track);
      $("video").srcObject = stream;
    });
    peer.addEventListener("connectionstatechange", () => {
      if (pc !== peer) return; // an earlier attempt's
      const state = peer.connectionState;
      if (state === "connected") {
        say("");
        startPolling();
      } else if (state === "failed" || state === "closed") {
        later("The stream was interrupted. " + waiting(), RETRY_S);
      } else if (state === "disconnected") {
        // Often back by itself within a second or two; if not, offer afresh.
        clearTimeout(retry);
        retry = setTimeout(() => {
          if (pc === peer && peer.connectionState !== "connected") connect();
        }, RETRY_S * 1000);
      }
    });
    try {
      const url = await LiveFuse.exchange(peer, endpoint);
      if (pc !== peer) {
        LiveFuse.hangUp(url);
        return;
      }
      resource = url;
      if (peer.connectionState !== "connected") say("Connecting…");
    } catch (error) {
      if (pc !== peer) return;
      if (error.status === 401 || error.status === 403) {
        askForToken(error);
      } else if (error.status === 404) {
        later(waiting(), RETRY_S); // nobody publishes there (yet, or any more)
      } else {
        const seconds = Number(error.retryAfter) || RETRY_S;
        later(`${describe(error)} Trying again in ${seconds} s.`, seconds);
      }
    }
  }

  // -- what the stream shows (GET /whep/STREAM while connected) -----------------------------

  function startPolling() {
    stopPolling();
    poll = setInterval(showState, RETRY_S * 1000);
    showState();
  }

  function stopPolling() {
    clearInterval(poll);
    poll = null;
  }

  async function showState() {
    const peer = pc;
    let state;
    try {
      state = await (await LiveFuse.api("GET", endpoint)).json();
    } catch (error) {
      if (pc !== peer) return;
      if (error.status === 404) connect(); // the stream has ended: wait for the next one
      else if (error.status === 401 || error.status === 403) stopPolling(); // plays; no more to say
      return;
    }
    if (pc !== peer) return;
    const faces = state.faces === 1 ? "1 face" : `${state.faces} faces`;
    if (!state.live) say(waiting());
    else if (!state.source) say(`No face chosen yet: the video goes out unswapped (${faces} in view).`);
    else say("");
  }

  window.addEventListener("pagehide", () => LiveFuse.hangUp(resource));
  LiveFuse.token();
  if (!window.RTCPeerConnection) say("This browser cannot play WebRTC video.");
  else connect();
})();
