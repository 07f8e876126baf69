"""The local model harness: a server that answers real completions, and leaves no process behind,
not when its owner is killed, not after `up --detach` / `down`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from needs import alive, unavailable, wait_gone

from local_llm import MODEL_ALIAS, model_venv

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "ops" / "llm" / "local_llm.py"


@pytest.fixture
def model_env() -> Path:
    python = model_venv() / "bin" / "python"
    if not python.exists():
        unavailable("model venv", f"{python.parent.parent} does not exist: run `make setup`")
    return python


def _complete(base_url: str) -> dict:
    body = json.dumps(
        {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def test_the_server_dies_when_its_owner_is_killed(model_env):
    script = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from local_llm import LocalLLM
        server = LocalLLM()
        url = server.start()
        print(server.process.pid, url, flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(RUNNER.parent)], stdout=subprocess.PIPE, text=True
    )
    try:
        pid, url = owner.stdout.readline().split()
        assert alive(int(pid))
        assert _complete(url)["choices"][0]["message"]["role"] == "assistant"
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
        assert wait_gone(int(pid)), f"model server {pid} outlived its killed owner"
    finally:
        owner.kill()


def test_up_detach_leaves_a_server_that_down_stops_by_pid(model_env, tmp_path):
    env = {**os.environ, "CEGRAPH_LLM_STATE": str(tmp_path / "state.json")}
    up = subprocess.run(
        [sys.executable, str(RUNNER), "up", "--detach"], capture_output=True, text=True, env=env, timeout=900
    )
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "state.json").read_text())
    try:
        assert up.stdout.strip() == state["address"]
        usage = _complete(state["address"])["usage"]
        assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] >= 1
        again = subprocess.run(
            [sys.executable, str(RUNNER), "up", "--detach"], capture_output=True, text=True, env=env
        )
        assert again.stdout.strip() == state["address"] and "already running" in again.stderr
    finally:
        down = subprocess.run([sys.executable, str(RUNNER), "down"], capture_output=True, text=True, env=env)
    assert down.returncode == 0 and f"pid {state['pid']}" in down.stderr
    assert wait_gone(state["pid"]) and not (tmp_path / "state.json").exists()
