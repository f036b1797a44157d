"""A real RTMP server for the relay's tests and benches: nginx with Debian's RTMP module
(`libnginx-mod-rtmp`, installed by `make servers`), on a loopback port of its own, with
its config, logs and pid in a temporary directory. `live on`: it forwards what a
publisher sends on `rtmp://127.0.0.1:PORT/live/NAME` to whoever plays that URL.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")


def nginx_rtmp_missing() -> str | None:
    """Why nginx-rtmp cannot run here, or None when it can."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx is not installed (make servers)"
    if not RTMP_MODULE.exists():
        return f"nginx's RTMP module is not installed ({RTMP_MODULE}; make servers)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


_CONFIG = """
load_module {module};
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 256; }}
rtmp {{
    server {{
        listen 127.0.0.1:{port};
        chunk_size 4096;
        application live {{
            live on;
            record off;
            # A player that joins gets the stream from its next keyframe, not a broken start.
            wait_key on;
            wait_video on;
        }}
    }}
}}
"""


@dataclass
class NginxRtmp:
    port: int
    root: Path
    process: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{name}"

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()  # not left running when it did not come up in time
            raise

    def _start(self) -> None:
        config = self.root / "nginx.conf"
        config.write_text(_CONFIG.format(module=RTMP_MODULE, root=self.root, port=self.port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen(
            [nginx, "-c", str(config), "-p", str(self.root), "-e", str(self.root / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.root / 'error.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start listening within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextmanager
def nginx_rtmp(port: int | None = None) -> Iterator[NginxRtmp]:
    with tempfile.TemporaryDirectory(prefix="livefuse-nginx-") as root:
        server = NginxRtmp(port=port or free_port(), root=Path(root))
        server.start()
        try:
            yield server
        finally:
            server.stop()
