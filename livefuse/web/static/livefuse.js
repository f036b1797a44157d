// Shared by the publisher page (/) and the viewer page (/watch/SESSION): the access token,
// API calls whose errors read as sentences, and a WHIP/WHEP offer/answer exchange.
"use strict";

const LiveFuse = (() => {
  const TOKEN_KEY = "livefuse-token";

  // A token may come in the address (#token=...), typed in, or from an earlier visit.
  function token() {
    const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
    if (fromHash) sessionStorage.setItem(TOKEN_KEY, fromHash);
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function setToken(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  function headers(extra) {
    const result = Object.assign({}, extra || {});
    const t = token();
    if (t) result.Authorization = "Bearer " + t;
    return result;
  }

  class ApiProblem extends Error {
    constructor(status, code, message, retryAfter) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfter = retryAfter;
    }
  }

  // The server's own message, put so a person knows what to do next.
  function explain(status, code, message, retryAfter) {
    if (status === 401) {
      return message.includes("wrong")
        ? "The access token is wrong. Enter the token the server was started with."
        : "This server needs an access token. Enter the token the server was started with.";
    }
    if (status === 503) {
      const wait = retryAfter ? ` Try again in ${retryAfter} seconds.` : " Try again shortly.";
      if (code === "not_ready") return "The server is still loading its face models." + wait;
      return "The server is busy: " + message.replace(/;.*$/, "") + "." + wait;
    }
    if (status === 413) return "That picture is too large: " + message + ".";
    if (status === 415) return "That file is not a picture the server can read: use a PNG, JPEG or WebP photo.";
    if (code === "no_face") return "No face was found in that picture. Use a photo with one clear, frontal face.";
    if (status === 404 && code === "unknown_session") {
      return "There is no live stream with this address (it may have ended).";
    }
    return message || `The server answered ${status}.`;
  }

  async function problemFrom(response) {
    const retryAfter = response.headers.get("Retry-After");
    const type = response.headers.get("Content-Type") || "";
    let code = "", message = "";
    if (type.includes("application/json")) {
      const body = await response.json().catch(() => ({}));
      code = (body.error && body.error.code) || "";
      message = (body.error && body.error.message) || "";
    } else {
      message = (await response.text().catch(() => "")).trim();
      if (response.status === 503 && message.startsWith("the service is not ready")) code = "not_ready";
      if (response.status === 404 && message.startsWith("no live session")) code = "unknown_session";
    }
    return new ApiProblem(response.status, code, explain(response.status, code, message, retryAfter), retryAfter);
  }

  async function api(method, path, body, contentType) {
    let response;
    try {
      response = await fetch(path, {
        method,
        headers: headers(contentType ? { "Content-Type": contentType } : {}),
        body,
      });
    } catch (error) {
      throw new ApiProblem(0, "network", "The server cannot be reached. Is livefuse still running?");
    }
    if (!response.ok) throw await problemFrom(response);
    return response;
  }

  // Wait until the browser has gathered its candidates (at most 2 s), so one offer holds them.
  function gathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState === "complete") {
          pc.removeEventListener("icegatheringstatechange", done);
          resolve();
        }
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, 2000);
    });
  }

  // POST the offer to a WHIP or WHEP endpoint; returns the resource's URL (for DELETE).
  async function exchange(pc, endpoint) {
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const response = await api("POST", endpoint, pc.localDescription.sdp, "application/sdp");
    const answer = await response.text();
    await pc.setRemoteDescription({ type: "answer", sdp: answer });
    return new URL(response.headers.get("Location"), location.href).toString();
  }

  async function hangUp(resource) {
    if (!resource) return;
    try {
      await fetch(resource, { method: "DELETE", headers: headers(), keepalive: true });
    } catch (error) {
      // the server is gone already; nothing is left to end
    }
  }

  // A peer connection with the server's STUN/TURN servers (short-lived TURN credentials
  // from GET /api/v1/ice-servers), so a browser on another network can reach it through
  // TURN. Without them (none configured, or the call fails) it still works on a LAN.
  async function peerConnection() {
    let iceServers = [];
    try {
      const response = await fetch("/api/v1/ice-servers", { headers: headers() });
      if (response.ok) iceServers = (await response.json()).iceServers || [];
    } catch (error) {
      iceServers = [];
    }
    return new RTCPeerConnection({ iceServers });
  }

  return { token, setToken, api, exchange, hangUp, peerConnection, ApiProblem };
})();
