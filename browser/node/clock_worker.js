// Timers for the page that a hidden tab's timer throttling does not stretch: Chromium wakes a
// hidden page's main-thread timers at most once a second (once a minute after 5 minutes
// hidden); a dedicated worker's timers are not throttled that way. stream_pump.js waits on it
// between polls of a socket's bufferedAmount (not tested hidden here: headless test pages are
// always visible).   in: {id, ms}   out: id, ms later.
self.onmessage = (ev) => {
  const { id, ms } = ev.data;
  setTimeout(() => self.postMessage(id), ms);
};
