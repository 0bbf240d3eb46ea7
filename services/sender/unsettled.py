"""Dead letters not durable yet, per source partition: a transactional sink commits no source offset
past one, or a kill would lose the event."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from shared.stage import Record


class UnsettledDeadLetters:
    """SinkDelivery's record of dead letters the runner has not written yet (a mixin: `unsettled`,
    `runner_letters` and `durable_offset` are set up in SinkDelivery's `__init__`)."""

    def hold_dead_letters(self, messages: list[ConsumerRecord]) -> None:  # type: ignore[type-arg]
        """The runner dead-letters these itself (undecodable, or failing unexpectedly alone): unsettled until
        its durable point passes them, like the handler's own dead letters."""
        for message in messages:
            self.unsettled.setdefault((message.topic, message.partition), {})[message.offset] = id(message)
            self.runner_letters.add(id(message))

    def _forget_refetched(self, records: list[Record], in_batch: set[int]) -> None:
        """Unsettled dead letters at or past a partition's first offset in this batch, of messages not in it,
        were given up (a revocation, the runner's one-at-a-time retry): this batch reads them again."""
        first: dict[tuple[str, int], int] = {}
        for record in records:
            tp = (record.message.topic, record.message.partition)
            first[tp] = min(first.get(tp, record.message.offset), record.message.offset)
        for tp, offset in first.items():
            letters = self.unsettled.get(tp)
            if letters:
                for stale in [
                    o
                    for o, message in letters.items()
                    if o >= offset and message not in in_batch and message not in self.runner_letters
                ]:
                    del letters[stale]
        if sum(len(letters) for letters in self.unsettled.values()) > 100_000:  # bound: partitions given away
            self.unsettled = {tp: letters for tp, letters in self.unsettled.items() if tp in first}
            self.runner_letters &= {m for letters in self.unsettled.values() for m in letters.values()}

    def _unsettled_from(self, topic: str, partition: int) -> int | None:
        """The lowest offset of the partition's dead letters not yet durable (held, or still being produced)."""
        letters = self.unsettled.get((topic, partition))
        if not letters:
            return None
        durable = self.durable_offset(TopicPartition(topic, partition))
        if durable is not None:
            for written in [o for o in letters if o < durable]:
                self.runner_letters.discard(letters.pop(written))
        return min(letters) if letters else None
