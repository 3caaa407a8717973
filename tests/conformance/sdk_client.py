"""Conformance: the official MCP Python SDK's stdio client drives mcp_server.py through every tool.

Run by .ci/run inside a throwaway virtual environment that has `mcp` installed; the product never
imports the SDK. Starts its own broker on a free port with a temporary state directory.
Exits non-zero, naming the step, on the first disagreement.
"""
import asyncio
import os
import re
import sys
import tempfile

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from helpers import MCP_SERVER, BrokerProcess  # noqa: E402

EXPECTED_TOOLS = {"join", "send", "check", "create_task", "list_tasks", "claim_task", "complete_task",
                  "lock_file", "unlock_file", "set_memory", "get_memory"}


def params(broker, name, cwd):
    env = {"CTL_PORT": str(broker.port), "CTL_STATE_DIR": broker.state_dir, "CTL_NAME": name,
           "PATH": os.environ.get("PATH", "")}
    return StdioServerParameters(command=sys.executable, args=[MCP_SERVER], env=env, cwd=cwd)


async def call(session, tool, arguments, expect_error=False):
    result = await session.call_tool(tool, arguments)
    text = result.content[0].text if result.content else ""
    if bool(result.is_error) != expect_error:
        raise SystemExit(f"{tool}({arguments}) isError={result.is_error}: {text}")
    if result.structured_content is not None:
        raise SystemExit(f"{tool} sent structuredContent to a client that did not ask for it")
    print(f"  {tool}: {'refused as expected' if expect_error else 'ok'} - {text.splitlines()[0][:90]}")
    return text


def task_id(text):
    return int(re.search(r"task #(\d+)", text).group(1))


async def run(broker, cwd):
    async with stdio_client(params(broker, "sdk-architect", cwd)) as (read_a, write_a), \
            stdio_client(params(broker, "sdk-worker", cwd)) as (read_w, write_w):
        async with ClientSession(read_a, write_a) as architect, ClientSession(read_w, write_w) as worker:
            init = await architect.initialize()
            await worker.initialize()
            print(f"initialized: {init.server_info.name} {init.server_info.version}, protocol {init.protocol_version}")
            listed = await architect.list_tools()
            names = {tool.name for tool in listed.tools}
            if names != EXPECTED_TOOLS:
                raise SystemExit(f"tools/list gave {sorted(names)}")
            if any(getattr(tool, "output_schema", None) or getattr(tool, "outputSchema", None) for tool in listed.tools):
                raise SystemExit("a tool declares an outputSchema but results are text unless a client asks")
            await worker.list_tools()
            print(f"tools/list: {len(names)} tools")
            await call(architect, "join", {"role": "architect", "summary": "conformance"})
            await call(worker, "join", {})
            await call(worker, "create_task", {"title": "not allowed"}, expect_error=True)
            first = task_id(await call(architect, "create_task", {"title": "first", "description": "do it"}))
            second = task_id(await call(architect, "create_task", {"title": "second", "depends_on": [first]}))
            await call(architect, "set_memory", {"key": "style", "value": "small"})
            await call(worker, "get_memory", {"key": "style"})
            await call(worker, "list_tasks", {"status": "ready"})
            await call(worker, "claim_task", {})
            await call(worker, "lock_file", {"path": "first.py", "reason": "task 1"})
            done = await call(worker, "complete_task", {"task_id": first, "summary": "wrote first.py",
                                                        "files": ["first.py"]})
            if f"Now ready: #{second}." not in done:
                raise SystemExit(f"completing the first task did not unblock the second: {done}")
            await call(worker, "unlock_file", {"path": "first.py"})
            await call(worker, "send", {"to": "sdk-architect", "content": "first is done", "category": "status"})
            inbox = await call(architect, "check", {"wait_seconds": 5})
            if not re.search(r"from sdk-worker \(worker, agent\).*\n<<<peer-text [0-9a-f]{12}\nfirst is done\n", inbox):
                raise SystemExit(f"check returned {inbox}")
            await call(worker, "send", {"to": "nobody", "content": "x"}, expect_error=True)


def main():
    broker = BrokerProcess(env={"CTL_RATE_LIMIT": "1000"}).start()
    try:
        asyncio.run(run(broker, tempfile.mkdtemp(prefix="ctl-sdk-")))
    finally:
        broker.cleanup()
    print("MCP SDK conformance: 1 passed, 0 failed")


if __name__ == "__main__":
    main()
