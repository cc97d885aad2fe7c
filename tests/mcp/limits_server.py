"""An MCP server for the agents' tests, on the official Python SDK (PyPI `mcp`, which
`mcp-server-time` brings): tools that show what a tool server runs under and how a run copes
with a tool that hangs or says too much.

- `limits`: the resource limits the server runs under (open files, file size, core dumps, CPU).
- `sleep`: answers after `seconds`.
- `shout`: `size` bytes of text.
"""

import asyncio
import resource

from mcp.server.mcpserver import MCPServer

server = MCPServer("stipend-test-limits")


@server.tool()
def limits() -> str:
    """The resource limits this server runs under."""
    names = {
        "nofile": resource.RLIMIT_NOFILE,
        "fsize": resource.RLIMIT_FSIZE,
        "core": resource.RLIMIT_CORE,
        "cpu": resource.RLIMIT_CPU,
    }
    return " ".join(f"{name}={resource.getrlimit(limit)[1]}" for name, limit in names.items())


@server.tool()
async def sleep(seconds: float) -> str:
    """Answers after `seconds`."""
    await asyncio.sleep(seconds)
    return "awake"


@server.tool()
def shout(size: int) -> str:
    """`size` bytes of text."""
    return "A" * size


if __name__ == "__main__":
    server.run("stdio")
