"""A TCP relay that delivers every chunk DELAY seconds after it arrived, in both directions:
one-way latency for the connections that go through it, without the kernel's netem (which the
machines this project is developed on lack). Bytes pass through untouched, so TLS still ends at
the real SuperLink. Standard library only: the docker test runs it inside a container.

While the target is down (a SuperLink restarting), an accepted connection waits for it, retrying
for up to UPSTREAM_WAIT seconds, as a client's own connect would keep retrying its SYNs on a real
path. Closing it at once instead would end the client's TLS handshake with an EOF, which Flower
1.41's SuperNode treats as a fatal TLS error: it gives up for good (see docs/deployment.md).

    python delay_proxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT DELAY_SECONDS
"""

import asyncio
import sys
import time

UPSTREAM_WAIT = 60.0


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while (item := await queue.get()) is not None:
            due, chunk = item
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(deliver())
    try:
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, chunk))
    except ConnectionError:
        pass
    queue.put_nowait(None)
    try:
        await sender
    except ConnectionError:
        pass


async def main(port: int, target: str, delay: float) -> None:
    host, target_port = target.rsplit(":", 1)

    async def handle(client_reader, client_writer) -> None:
        deadline = time.monotonic() + UPSTREAM_WAIT
        while True:
            try:
                server_reader, server_writer = await asyncio.open_connection(host, int(target_port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    client_writer.close()
                    return
                await asyncio.sleep(0.5)
        await asyncio.gather(pipe(client_reader, server_writer, delay),
                             pipe(server_reader, client_writer, delay))

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print(f"delay proxy: :{port} -> {target}, {delay}s each way", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], float(sys.argv[3])))
