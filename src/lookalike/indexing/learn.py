"""What an index learns from its whole collection (the whitening), the same however its
build was split into runs.

While an index has no whitening, every committed chunk of images also stores their sampled
regional descriptors in ``regions.sqlite`` (:mod:`lookalike.index.regions`), committed before
the images themselves. The run that leaves the index complete (no whitening yet, at least
``min_images`` images) learns the whitening from the samples of the first images by id, up
to :data:`~lookalike.index.regions.REGION_SAMPLE` descriptors, and deletes the file. Whether
the build ran in one go or was killed and resumed any number of times, the samples, and so
the whitening, are the same.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np

from lookalike.extract import ExtractConf
from lookalike.images import Decoded
from lookalike.index import IndexStore
from lookalike.index.regions import REGION_SAMPLE, RegionSamples, remove_samples, sample_regions
from lookalike.whitening import WhiteningConf, learn_whitening

logger = logging.getLogger(__name__)


class WhiteningLearner:
    """The samples of an index without whitening yet, opened by its writer for one run.

    Use :meth:`open`; then :meth:`add` each chunk before committing it, :meth:`finish` at the
    end of the run and :meth:`close` in any case.
    """

    def __init__(self, store: IndexStore, conf: WhiteningConf) -> None:
        self.store = store
        self.conf = conf
        self.samples = RegionSamples(store.path)
        try:
            self.samples.retain(r.content_hash for r in store.records(status="ok"))
        except BaseException:
            self.samples.close()
            raise

    @classmethod
    def open(cls, store: IndexStore, conf: ExtractConf) -> WhiteningLearner | None:
        """The learner of this run, or None where nothing is to be learned (the settings
        have no whitening, or the index has one: then leftover samples are deleted)."""
        if conf.whitening is None or store.whitening is not None:
            if remove_samples(store.path):
                logger.info("deleted the region samples of a whitening already learned")
            return None
        return cls(store, conf.whitening)

    @property
    def wants_regions(self) -> bool:
        """Whether chunks described from now on still add samples (not yet at the cap)."""
        return self.samples.total < REGION_SAMPLE

    def add(self, decoded: Sequence[Decoded], regions: Sequence[np.ndarray]) -> None:
        """Store the samples of one chunk, committed, before the chunk itself is.

        Args:
            decoded: the chunk's files, failed ones included.
            regions: ``(R, D)`` regional descriptors of each file decoded without error, in
                order.

        The whole chunk is stored or none of it (the cap is checked per chunk), so which
        images have samples depends only on the chunks, never on the runs.
        """
        if not self.wants_regions:
            return
        good = [d for d in decoded if d.error is None]
        if len(good) != len(regions):
            raise ValueError(f"{len(good)} images decoded but {len(regions)} region sets")
        self.samples.put(
            [
                (d.content_hash, sample_regions(r, d.content_hash))
                for d, r in zip(good, regions, strict=True)
                if d.content_hash is not None
            ]
        )

    def finish(self) -> bool:
        """At the end of a run: learn the whitening when the index has enough images, then
        delete the samples; whether it was learned."""
        if len(self.store) < self.conf.min_images:
            return False
        data, source = self._data()
        self.store.set_whitening(learn_whitening(data, self.conf))
        logger.info("learned the whitening from %s", source)
        self.samples.close()
        remove_samples(self.store.path)
        return True

    def _data(self) -> tuple[np.ndarray, str]:
        """The descriptors to learn from: the samples of the first images by id, up to the
        cap; or, for an index whose first images have none (built by an older version), the
        global descriptors of the first images."""
        parts, total = [], 0
        for record in self.store.records(status="ok"):
            if total >= REGION_SAMPLE:
                break
            sample = None if record.content_hash is None else self.samples.get(record.content_hash)
            if sample is None:  # beyond the images sampled (after removals), or an old index
                break
            parts.append(sample)
            total += len(sample)
        if len(parts) >= self.conf.min_images:
            data = np.concatenate(parts).astype(np.float32)
            return data, f"{len(data)} regional descriptors of {len(parts)} images"
        logger.warning(
            "the first images of %s have no stored region samples (indexed by an older "
            "version): learning the whitening from their global descriptors",
            self.store.path,
        )
        ids = [r.id for r in itertools.islice(self.store.records(status="ok"), REGION_SAMPLE)]
        return self.store.vectors(ids), f"{len(ids)} global descriptors"

    def close(self) -> None:
        self.samples.close()


__all__ = ["WhiteningLearner"]
