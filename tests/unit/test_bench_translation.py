"""bench.translation's client judges a stream by how its API ends one, wherever the reads split it."""

from __future__ import annotations

import asyncio

import pytest

from bench.translation import CHAT, MESSAGES, RESPONSES, Api, ApiClient, Tally


class Transport:
    def get_extra_info(self, name: str) -> None:
        return None

    def write(self, data: bytes) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def named(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


def messages_stream(tokens: int, stop_at: int | None = None) -> list[bytes]:
    deltas = [named("content_block_delta", '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta",'
                                           f'"text":" tok{i}"}}}}') for i in range(tokens)]
    events = [named("message_start", '{"type":"message_start","message":{}}'),
              named("content_block_start", '{"type":"content_block_start","index":0}'), *deltas,
              named("content_block_stop", '{"type":"content_block_stop","index":0}'),
              named("message_delta", '{"type":"message_delta","delta":{"stop_reason":"end_turn"}}'),
              named("message_stop", '{"type":"message_stop"}')]
    if stop_at is not None:  # a message_stop moved into the middle of the stream
        events.insert(stop_at, events.pop())
    return events


def responses_stream(tokens: int) -> list[bytes]:
    names = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
             *(["response.output_text.delta"] * tokens), "response.output_text.done", "response.content_part.done",
             "response.output_item.done", "response.completed"]
    return [named(name, f'{{"type":"{name}","sequence_number":{i},"text":"x"}}') for i, name in enumerate(names)]


def chat_stream(tokens: int) -> list[bytes]:
    chunks = [b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n']
    chunks += [b'data: {"choices":[{"delta":{"content":" tok%d"}}]}\n\n' % i for i in range(tokens)]
    return [*chunks, b"data: [DONE]\n\n"]


def response(events: list[bytes]) -> bytes:
    """The whole HTTP response: one chunk per event, as the proxy writes a stream."""
    body = b"".join(b"%x\r\n%b\r\n" % (len(event), event) for event in events)
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


def receive(api: Api, expected: int, pieces: list[bytes]):
    async def run():
        client = ApiClient(api, expected, Tally())
        client.connection_made(Transport())
        pending = asyncio.ensure_future(client.request(b"POST / HTTP/1.1\r\n\r\n", 5.0))
        await asyncio.sleep(0)
        for piece in pieces:
            client.data_received(piece)
        return await pending, client.tally
    return asyncio.run(run())


def every_split(raw: bytes) -> list[list[bytes]]:
    """The response as two reads cut at every byte, and as one read per byte."""
    return [[raw[:cut], raw[cut:]] for cut in range(1, len(raw))] + [[raw[i:i + 1] for i in range(len(raw))]]


@pytest.mark.parametrize(("api", "events"), [(MESSAGES, messages_stream(3)), (RESPONSES, responses_stream(3)),
                                             (CHAT, chat_stream(3))], ids=["messages", "responses", "chat"])
def test_a_whole_stream_passes_however_the_reads_cut_it(api, events):
    raw = response(events)
    for pieces in every_split(raw):
        result, tally = receive(api, 3 + api.extra_events, pieces)
        assert result.ok, (result.error, pieces)
        assert result.events == tally.events == 3 + api.extra_events
        assert tally.events_per_stream == {3 + api.extra_events: 1}


@pytest.mark.parametrize(("api", "events", "expected", "error"), [
    (MESSAGES, messages_stream(3, stop_at=3), 8, "did not end with"),  # message_stop not last
    (MESSAGES, messages_stream(3)[:-1], 8, "did not end with"),  # cut before message_stop
    (MESSAGES, messages_stream(3) + messages_stream(3)[-1:], 9, "2 `event: message_stop` events"),
    (MESSAGES, messages_stream(4), 8, "9 events, expected 8"),
    (RESPONSES, responses_stream(3)[:-1], 11, "0 `event: response.completed` events"),
    (RESPONSES, [*responses_stream(3)[:-1], named("response.incomplete", "{}")], 11, "0 `event: response.completed`"),
    (CHAT, chat_stream(3)[:-1], 5, "did not end with"),
    (CHAT, chat_stream(2), 5, "4 events, expected 5"),
], ids=["messages-stop-early", "messages-cut", "messages-two-stops", "messages-extra-event", "responses-cut",
        "responses-incomplete", "chat-cut", "chat-short"])
def test_a_stream_that_does_not_end_as_its_api_ends_one_fails(api, events, expected, error):
    raw = response(events)
    for pieces in ([raw], [raw[:len(raw) // 2], raw[len(raw) // 2:]]):
        result, tally = receive(api, expected, pieces)
        assert not result.ok and error in result.error, result.error
        assert not tally.events_per_stream
