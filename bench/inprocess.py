"""A Flower Grid that runs ClientApp handlers in this process: strategies and apps in unit tests
without SuperLink or Ray."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

Handler = Callable[[Message, Context], Message]


class InProcessGrid:
    """Node ids map to Contexts; each message goes to `handlers[message_type]` with its node's
    Context. A handler that raises answers with an error reply (code 2), as a ClientApp would."""

    def __init__(self, handlers: dict[str, Handler], node_configs: dict[int, dict],
                 run_config: dict, shuffle_seed: int | None = None) -> None:
        self.handlers = handlers
        # Flower's runtime sets this in every app process; Messages cannot be built without it.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        # Replies come back in a random order when seeded, as they do from real nodes.
        self.rng = random.Random(shuffle_seed) if shuffle_seed is not None else None
        self.contexts = {node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(),
                                       run_config=run_config)
                         for node, cfg in node_configs.items()}
        self.replies: list[list[Message]] = []  # every push's replies, in the order pulled
        self._outbox: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Each message is handled at once; its reply waits for `pull_messages`."""
        ids, replies = [], []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's grids do
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            try:
                replies.append(self.handlers[msg.metadata.message_type](msg, self.contexts[node]))
            except Exception as e:  # noqa: BLE001 - a ClientApp's exception becomes an error reply
                replies.append(Message(Error(code=2, reason=f"{type(e).__name__}: {e}"), reply_to=msg))
        if self.rng is not None:
            self.rng.shuffle(replies)
        self.replies.append(replies)
        self._outbox.extend(replies)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        pulled = [r for r in self._outbox if r.metadata.reply_to_message_id in wanted]
        self._outbox = [r for r in self._outbox if r.metadata.reply_to_message_id not in wanted]
        return pulled
