// Live answer player: plays the answer's PCM the moment it reaches the page, through Web Audio.
// Why: Gradio's streaming gr.Audio goes through AAC + HLS polling and starts about a second late;
// this opens one HTTP stream at the Submit click (omni/live/<key>, framed PCM16, see web_live.py)
// and schedules each chunk exactly where the previous one ends, so joins have no gaps.
(() => {
  if (window.omniLive) return;
  const LEAD_S = 0.03;          // scheduling margin for the first chunk and after an underrun
  const HEADER_BYTES = 8;       // <u32 sample_rate><u32 n_bytes>, little endian

  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);   // works on plain http too, unlike crypto.randomUUID
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  class LivePlayer {
    constructor() {
      this.ctx = null;
      this.output = null;
      this.timer = null;
      this.reset(null);
    }

    reset(key) {
      this.key = key;
      this.sources = [];
      this.segments = [];         // [start, duration] in AudioContext time, one per chunk
      this.abort = null;
      this.nextTime = 0;
      this.firstStart = null;
      this.beganAt = null;
      this.firstChunkAt = null;
      this.firstSoundAt = null;
      this.chunks = 0;
      this.scheduledSeconds = 0;
      this.gaps = [];
      this.done = false;
    }

    ensureContext(rate) {
      if (!this.ctx) {
        this.ctx = new AudioContext({ latencyHint: "interactive", sampleRate: rate || 16000 });
        this.output = this.ctx.createGain();
        this.output.connect(this.ctx.destination);
      }
      if (this.ctx.state === "suspended") this.ctx.resume();
    }

    // Called from the Submit click (a user gesture, so the AudioContext may start).
    begin() {
      this.stop();
      const key = newKey();
      this.reset(key);
      this.beganAt = performance.now();
      try { this.ensureContext(16000); } catch (err) { console.warn("omniLive: no Web Audio", err); return key; }
      const abort = new AbortController();
      this.abort = abort;
      const url = new URL("omni/live/" + key, window.location.href.split("?")[0].replace(/[^/]*$/, ""));
      fetch(url, { signal: abort.signal, cache: "no-store" })
        .then((response) => (response.ok && response.body ? this.read(response.body.getReader(), key) : null))
        .catch(() => {})
        .finally(() => { if (this.key === key) { this.done = true; this.render(); } });
      this.tick();
      return key;
    }

    async read(reader, key) {
      let pending = new Uint8Array(0);
      for (;;) {
        const { value, done } = await reader.read();
        if (done || this.key !== key) return;
        const joined = new Uint8Array(pending.length + value.length);
        joined.set(pending);
        joined.set(value, pending.length);
        let offset = 0;
        while (joined.length - offset >= HEADER_BYTES) {
          const view = new DataView(joined.buffer, offset, HEADER_BYTES);
          const rate = view.getUint32(0, true);
          const size = view.getUint32(4, true);
          if (joined.length - offset - HEADER_BYTES < size) break;
          this.play(joined.subarray(offset + HEADER_BYTES, offset + HEADER_BYTES + size), rate);
          offset += HEADER_BYTES + size;
        }
        pending = joined.slice(offset);
      }
    }

    play(pcm, rate) {
      const n = pcm.length >> 1;
      if (!n || !this.ctx) return;
      const view = new DataView(pcm.buffer, pcm.byteOffset, n * 2);
      const buffer = this.ctx.createBuffer(1, n, rate);
      const channel = buffer.getChannelData(0);
      for (let i = 0; i < n; i++) channel[i] = view.getInt16(2 * i, true) / 32768;
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.output);
      const now = this.ctx.currentTime;
      let when = this.nextTime;
      if (this.firstStart === null) {
        when = now + LEAD_S;
        this.firstStart = when;
        this.firstChunkAt = performance.now();
        this.firstSoundAt = this.firstChunkAt + LEAD_S * 1000;
      } else if (when < now + 0.005) {
        const late = now + LEAD_S - when;          // underrun: the chunk came after the last one ended
        this.gaps.push({ at: when - this.firstStart, seconds: late });
        when = now + LEAD_S;
      }
      source.start(when);
      this.sources.push(source);
      this.segments.push([when, buffer.duration]);
      source.onended = () => { this.sources = this.sources.filter((s) => s !== source); };
      this.nextTime = when + buffer.duration;
      this.chunks += 1;
      this.scheduledSeconds += buffer.duration;
    }

    // Seconds of this answer's audio played so far (0 before the first sound), like <audio>.currentTime:
    // time spent waiting for a late chunk does not count.
    get currentTime() {
      if (!this.ctx) return 0;
      const now = this.ctx.currentTime;
      let played = 0;
      for (const [start, duration] of this.segments) played += Math.min(Math.max(now - start, 0), duration);
      return played;
    }

    get playing() {
      return !!this.ctx && this.firstStart !== null && this.ctx.currentTime < this.nextTime;
    }

    stop() {
      if (this.abort) this.abort.abort();
      for (const source of this.sources) { try { source.stop(); } catch (err) { /* already ended */ } }
      this.sources = [];
      if (this.ctx) {  // what was scheduled but not played never will be
        const now = this.ctx.currentTime;
        this.segments = this.segments.map(([start, duration]) => [start, Math.min(duration, Math.max(now - start, 0))]);
        this.nextTime = Math.min(this.nextTime, now);
      }
      this.key = null;
      this.done = true;
      this.render();
    }

    stats() {
      return {
        key: this.key, chunks: this.chunks, scheduledSeconds: this.scheduledSeconds,
        currentTime: this.currentTime, playing: this.playing, done: this.done, gaps: this.gaps,
        beganAt: this.beganAt, firstChunkAt: this.firstChunkAt, firstSoundAt: this.firstSoundAt,
        sampleRate: this.ctx ? this.ctx.sampleRate : null, state: this.ctx ? this.ctx.state : "none",
      };
    }

    tick() {
      if (this.timer) return;
      this.timer = setInterval(() => {
        this.render();
        if (!this.playing && (this.done || this.key === null)) { clearInterval(this.timer); this.timer = null; this.render(); }
      }, 100);
    }

    render() {
      const box = document.querySelector("#live_player .omni-live");
      if (!box) return;
      const label = box.querySelector(".omni-live-label");
      const speaking = this.playing;
      box.classList.toggle("speaking", speaking);
      box.classList.toggle("waiting", !speaking && this.key !== null && !this.done);
      if (label) {
        if (speaking) label.textContent = "Speaking… " + this.currentTime.toFixed(1) + " s";
        else if (this.key !== null && !this.done) label.textContent = "Waiting for the answer…";
        else if (this.scheduledSeconds > 0) label.textContent = "Played " + this.scheduledSeconds.toFixed(1) + " s of speech";
        else label.textContent = "Ready";
      }
    }
  }

  window.omniLive = new LivePlayer();
})();
