// capsa's screen viewer: noVNC's RFB client on the sandbox's VNC WebSocket.
// The page says where the WebSocket is and whether input is allowed
// (data-ws, data-view-only); the server enforces view-only on its side too.
import RFB from './novnc/core/rfb.js';

const body = document.body;
const status = document.getElementById('status');
const url = new URL(body.dataset.ws, location.href);
url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';

const rfb = new RFB(document.getElementById('screen'), url.href, { wsProtocols: ['binary'] });
rfb.viewOnly = body.dataset.viewOnly === 'true';
rfb.scaleViewport = false;
rfb.resizeSession = false;
rfb.addEventListener('connect', () => {
    status.textContent = 'connected';
    window.capsaViewer.connectedAt = performance.now();
});
rfb.addEventListener('disconnect', (e) => {
    status.textContent = e.detail.clean ? 'disconnected' : 'connection lost';
    window.capsaViewer.disconnectedAt = performance.now();
});
rfb.addEventListener('desktopname', (e) => {
    document.title = 'capsa: ' + e.detail.name;
});
// For tests and the curious: the client and its timings.
window.capsaViewer = { rfb, connectedAt: null, disconnectedAt: null };
