"""TFDS builder for local video-text data, and a Grain source that reads it back as klingjax video records.

Build (no TensorFlow needed; `file_format="array_record"` is required for random access):

    builder = KlingjaxVideoText(data_dir=DATA, config=VideoTextConfig(name="s128", max_side=128),
                                file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=VIDEOS))

VIDEOS holds videos with sidecar captions (a.mp4 + a.txt), or a captions.csv / captions.jsonl with
`path, caption[, start, end]` rows (see `klingjax.data.inputs.list_inputs`). Clips are validated, cut and
resized exactly as `data_pipelines/convert_videos.py` does; each example keeps the *encoded* mp4 bytes
(no frame tensors). Unusable inputs are left out and listed in `builder.info.metadata["skipped"]`.

Read: `grain.MapDataset.source(TfdsVideoRecords("klingjax_video_text/s128", split="train", data_dir=DATA))`
yields encoded klingjax records, the same bytes an ArrayRecord shard of `convert_videos` holds, so the
pipeline's `decode_record` + `decode_video_record` / `VideoDecoder` apply unchanged.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from klingjax.data.inputs import list_inputs
from klingjax.data.probe import ClipError, input_record
from klingjax.data.records import encode_record, make_video_record

CAPTION_FILES = ("captions.csv", "captions.jsonl")  # looked for in manual_dir when no captions file is configured


@dataclasses.dataclass(eq=False)
class VideoTextConfig(tfds.core.BuilderConfig):
    """Builder config: captions file in manual_dir (None: captions.csv/.jsonl if present, else sidecars), sizes."""

    captions: str | None = None
    max_side: int | None = None
    min_frames: int = 1
    reencode: bool = False


class KlingjaxVideoText(tfds.core.GeneratorBasedBuilder):
    """Captioned local videos as encoded mp4 bytes + caption + fps / frame count / size (one split, "train")."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [VideoTextConfig(name="default", description="Clips at their source size.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the videos in manual_dir with a caption per video: a sidecar text file (clip.mp4 + clip.txt), or "
        "one captions.csv / captions.jsonl with path, caption[, start, end] rows (paths relative to it).")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup imports `importlib_resources`, which tensorflow-datasets uses but does not require.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local video-text pairs; videos stay encoded (mp4 bytes).",
            features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(), dtype=np.object_, doc="mp4 file bytes"),
                "caption": tfds.features.Text(),
                "fps": tfds.features.Scalar(dtype=np.float32),
                "num_frames": tfds.features.Scalar(dtype=np.int32),
                "height": tfds.features.Scalar(dtype=np.int32),
                "width": tfds.features.Scalar(dtype=np.int32),
                "meta_json": tfds.features.Text(doc="source path, start / end, duration, ... as JSON"),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _source(self, manual_dir: str) -> str:
        captions = self.builder_config.captions
        if captions is not None:
            return os.path.join(manual_dir, captions)
        found = [os.path.join(manual_dir, n) for n in CAPTION_FILES if os.path.isfile(os.path.join(manual_dir, n))]
        if len(found) > 1:
            raise ValueError(f"{manual_dir} has both {CAPTION_FILES}; set VideoTextConfig(captions=...) to pick one")
        return found[0] if found else manual_dir

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"train": self._generate_examples(self._source(os.fspath(dl_manager.manual_dir)))}

    def _generate_examples(self, source: str):
        config, skipped = self.builder_config, []
        for item in list_inputs(source):
            try:
                record, _ = input_record(item, max_side=config.max_side, min_frames=config.min_frames,
                                         reencode=config.reencode)
            except Exception as e:  # noqa: BLE001 - ClipError has the reason; anything else must not stop the build
                reason = str(e) if isinstance(e, ClipError) else f"unexpected error: {type(e).__name__}: {e}"
                skipped.append({"index": item.index, "path": item.name, "reason": reason})
                logging.info("skipping %s: %s", item.name, reason)
                continue
            yield item.index, {
                "video": record["video"], "caption": record["caption"], "fps": record["fps"],
                "num_frames": record["num_frames"], "height": record["height"], "width": record["width"],
                "meta_json": json.dumps(record["meta"], sort_keys=True),
            }
        self.info.metadata["skipped"] = skipped  # saved to metadata.json with the dataset info
        logging.info("%s: skipped %d of the inputs in %s", self.name, len(skipped), source)


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def example_to_record(example: Mapping[str, Any]) -> dict:
    """A TFDS example (numpy values, as a data source returns it) -> klingjax video record dict (codec "mp4")."""
    return make_video_record(bytes(example["video"]), codec="mp4", caption=_text(example["caption"]),
                             fps=float(example["fps"]), num_frames=int(example["num_frames"]),
                             height=int(example["height"]), width=int(example["width"]),
                             meta=json.loads(_text(example["meta_json"])))


def video_text_source(name: str, *, split: str = "train", data_dir: str | None = None):
    """Random-access TFDS data source of a built video-text dataset (needs `file_format="array_record"`)."""
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


class TfdsVideoRecords(grain.sources.RandomAccessDataSource):
    """Grain source over a TFDS video-text split: element i is example i as encoded klingjax record bytes."""

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None):
        self._name, self._split, self._data_dir = name, split, data_dir
        self._source = video_text_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> bytes:
        return encode_record(example_to_record(self._source[index]))

    def __getstate__(self) -> dict:  # worker processes reopen the files instead of pickling readers
        return {"name": self._name, "split": self._split, "data_dir": self._data_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name"], split=state["split"], data_dir=state["data_dir"])

    def __repr__(self) -> str:
        return f"TfdsVideoRecords({self._name!r}, split={self._split!r}, data_dir={self._data_dir!r})"
