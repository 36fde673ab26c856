"""Python peers of the benchmark: consume COUNT JSON messages from QUEUE, parse each,
ack each, and print one JSON line: count, wall seconds and process CPU seconds from the
first message to the last.

usage: peers.py <aio-pika|faststream> <url> <queue> <count>
"""

import asyncio
import json
import resource
import sys
import time

PREFETCH = 256


class Window:
    def __init__(self):
        self.wall = None
        self.cpu = None

    def start(self):
        if self.wall is None:
            self.wall = time.perf_counter()
            self.cpu = cpu()

    def finish(self, count):
        return {"count": count, "secs": time.perf_counter() - self.wall, "cpu_secs": cpu() - self.cpu}


def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def aio_pika_consume(url, queue, count):
    import aio_pika

    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q = await channel.get_queue(queue, ensure=False)
    window, done, seen = Window(), asyncio.Event(), [0]

    async def on_message(message):
        window.start()
        json.loads(message.body)
        await message.ack()
        seen[0] += 1
        if seen[0] == count:
            done.set()

    await q.consume(on_message)
    await done.wait()
    result = window.finish(count)
    await connection.close()
    return result


async def faststream_consume(url, queue, count):
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    # Without its per-message log lines, which would cost more than the consume itself.
    broker = RabbitBroker(url, logger=None)
    window, done, seen = Window(), asyncio.Event(), [0]

    # The queue exists (a quorum queue): consume it without declaring it.
    @broker.subscriber(RabbitQueue(queue, declare=False), channel=Channel(prefetch_count=PREFETCH))
    async def handle(body: dict):
        window.start()
        seen[0] += 1
        if seen[0] == count:
            done.set()

    await broker.start()
    await done.wait()
    result = window.finish(count)
    await broker.stop()
    return result


def main():
    kind, url, queue, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    consume = {"aio-pika": aio_pika_consume, "faststream": faststream_consume}[kind]
    print(json.dumps(asyncio.run(consume(url, queue, count))), flush=True)


if __name__ == "__main__":
    main()
