"""A fault-injecting HTTP proxy in front of the real MLflow server: it forwards every request,
except those it is told to answer with a fault (503 + Retry-After, 500, a hang, an HTML page, a
400 for batches holding a refused metric key), and it can stop
listening for a while (connection refused). It counts what it forwarded, so tests can check that
nothing was sent twice (MLflow drops exact duplicate metrics silently)."""
import collections
import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.faults = []          # list of (path_fragment, action) consumed in order; action: ("status", code, retry_after) | ("html", code, retry_after) | ("hang", seconds)
        self.forwarded = {}       # path -> count of forwarded requests answered 2xx
        self.metrics_forwarded = 0
        self.points = collections.Counter()  # (run_id, key, step, timestamp) -> times forwarded
        self.faults_served = 0
        self.refused_keys = set()  # log-batch calls holding a metric of these keys are answered 400, as MLflow names a bad key
        self.refusals_served = 0
        self.log_batch_delay = 0.0  # seconds each log-batch waits before it is forwarded (a slow server)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = proxy.take_fault(self.path)
                if action and action[0] == "hang":
                    time.sleep(action[1])
                    self.close_connection = True
                    return
                if action and action[0] in ("status", "html"):
                    # MLflow's error JSON, or a proxy's HTML page (which no JSON parser reads)
                    html = action[0] == "html"
                    payload = (b"<html><body><h1>%d Bad Gateway</h1><hr>nginx</body></html>" % action[1] if html
                               else json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected"}).encode())
                    self.send_response(action[1])
                    if action[2] is not None:
                        self.send_header("Retry-After", str(action[2]))
                    self.send_header("Content-Type", "text/html" if html else "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if proxy.log_batch_delay and "runs/log-batch" in self.path:
                    time.sleep(proxy.log_batch_delay)
                refused = proxy.refused_key(self.path, body)
                if refused is not None:
                    payload = json.dumps({"error_code": "INVALID_PARAMETER_VALUE",
                                          "message": f"Invalid metric name: '{refused}'. Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( ), and slashes (/)."}).encode()
                    self.send_response(400)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if 200 <= response.status < 300:
                    proxy.count(self.path, body)
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop_listening(self):
        self.server.shutdown()
        self.server.server_close()

    def take_fault(self, path):
        with self.lock:
            for i, (fragment, action) in enumerate(self.faults):
                if fragment in path:
                    del self.faults[i]
                    self.faults_served += 1
                    return action
        return None

    def refused_key(self, path, body):
        """The first refused key among a log-batch's metrics, or None."""
        with self.lock:
            if not self.refused_keys or "runs/log-batch" not in path:
                return None
            for m in json.loads(body).get("metrics", []):
                if m["key"] in self.refused_keys:
                    self.refusals_served += 1
                    return m["key"]
        return None

    def count(self, path, body):
        key = path.split("?")[0]
        with self.lock:
            self.forwarded[key] = self.forwarded.get(key, 0) + 1
            if key.endswith("runs/log-batch"):
                batch = json.loads(body)
                self.metrics_forwarded += len(batch.get("metrics", []))
                for m in batch.get("metrics", []):
                    self.points[(batch.get("run_id"), m["key"], int(m.get("step", 0)), int(m["timestamp"]))] += 1

    def close(self):
        try:
            self.stop_listening()
        except Exception:
            pass
