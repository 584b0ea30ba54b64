"""The demo behind scripts/demo: build a model, declare it, start the agent, ask it once."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nodecache.serve.client import NodeClient
from nodecache.serve.examples import write_mlp_onnx

HOME = Path(".nodecache")
SOURCE = HOME / "demo-source" / "mlp"
DECLARATIONS = HOME / "declarations"
SOCKET = HOME / "run" / "nodecache.sock"

DECLARATION = """\
apiVersion: nodecache.io/v1alpha1
kind: LocalModelCache
metadata:
  name: demo-mlp
spec:
  sourceModelUri: {uri}
  modelSize: 64Ki
  nodeGroups: [default]
"""


async def wait_warm(client: NodeClient, name: str, agent: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    state = None
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            sys.exit(f"demo: the agent exited with code {agent.returncode}")
        try:
            status = await client.get("/nodecache/v1/status")
            models = {m["name"]: m for m in status["models"]}
            model = models.get(name, {})
            if model.get("state") != state:
                state = model.get("state")
                print(f"demo: {name} is {state}", flush=True)
            if state == "Warm":
                return
        except OSError:
            pass  # socket not there yet
        await asyncio.sleep(0.1)
    sys.exit(f"demo: {name} did not become Warm within 60 s (last state: {state})")


async def ask(agent: subprocess.Popen[bytes]) -> None:
    async with NodeClient(SOCKET) as client:
        await wait_warm(client, "demo-mlp", agent)
        request = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 64],
                    "data": np.linspace(-1, 1, 64).round(3).tolist(),
                }
            ]
        }
        print(f"demo: POST /v2/models/demo-mlp/infer over {SOCKET}")
        print("request: " + json.dumps(request))
        answer = await client.post("/v2/models/demo-mlp/infer", request)
        print("answer:  " + json.dumps(answer))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the first answer")
    args = parser.parse_args()

    write_mlp_onnx(SOURCE / "model.onnx")
    DECLARATIONS.mkdir(parents=True, exist_ok=True)
    (DECLARATIONS / "demo-mlp.yaml").write_text(DECLARATION.format(uri=SOURCE.resolve().as_uri()))
    print(f"demo: built an ONNX MLP in {SOURCE}, declared it in {DECLARATIONS}/demo-mlp.yaml")
    command = [
        sys.executable, "-m", "nodecache.agent.cli", "agent",
        "--declarations", str(DECLARATIONS),
        # Interactive runs expose /metrics on the usual port; --once stays off the network.
        "--metrics-port", "0" if args.once else os.environ.get("NODECACHE_METRICS_PORT", "9464"),
    ]  # fmt: skip
    print("demo: starting " + " ".join(["nodecache", *command[3:]]), flush=True)
    agent = subprocess.Popen(command)
    try:
        asyncio.run(ask(agent))
        if args.once:
            return 0
        print("demo: the agent keeps serving on", SOCKET, "- try `nodecache status`; Ctrl-C stops")
        return agent.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
