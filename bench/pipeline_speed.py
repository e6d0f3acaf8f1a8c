"""Benchmark: does the input pipeline keep up with the model?

    python bench/pipeline_speed.py [--data ../shared/data/ham10000] [--model small] [--size 64] [--images 2048]

Training images/s of one model fed (a) by the real tf.data pipeline from JPEG files with
augmentation (cache none: decode every epoch; cache memory: the default, steady state after the
first epoch) and (b) by pre-decoded in-memory tensors; inference images/s with and without flip
TTA. Prints the ratio (a)/(b) (target >= 0.95) and writes bench/results/pipeline_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import provenance  # noqa: E402

from cnn.backbones import build_classifier  # noqa: E402
from cnn.pipeline import build_augmenter, image_dataset, predict_tta  # noqa: E402
from metadata.dataset import load_dataset  # noqa: E402
from rundir.io import write_json  # noqa: E402


def images_per_second(run: callable, n_images: int, repeats: int = 2) -> float:
    """Best of `repeats` timed runs (the first call of each feed has already warmed up)."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return n_images / min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    parser.add_argument("--model", default="small")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    table = load_dataset(args.data).table.head(args.images)
    paths, labels = table["image_path"].tolist(), table["target"].to_numpy(dtype=np.float32)
    n = len(paths)
    model = build_classifier(args.model, args.size)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="binary_crossentropy")
    feeds = {
        "jpeg_augmented_cache_none": image_dataset(paths, labels, args.size, args.batch_size, shuffle=True,
                                                   augment=build_augmenter(0), cache="none"),
        "jpeg_augmented_cache_memory": image_dataset(paths, labels, args.size, args.batch_size, shuffle=True,
                                                     augment=build_augmenter(0), cache="memory"),
    }
    decoded = np.concatenate([x.numpy() for x in image_dataset(paths, None, args.size, 256)])
    results = {}
    for name, feed in feeds.items():
        model.fit(feed, epochs=1, verbose=0)  # warm-up: graph tracing, cache fill
        results[name] = images_per_second(lambda f=feed: model.fit(f, epochs=1, verbose=0, shuffle=False), n)
    model.fit(decoded, labels, batch_size=args.batch_size, epochs=1, verbose=0)
    results["in_memory_tensors"] = images_per_second(
        lambda: model.fit(decoded, labels, batch_size=args.batch_size, epochs=1, verbose=0), n
    )
    inference = image_dataset(paths, None, args.size, 128)
    predict_tta(model, inference, ("none",))
    results["inference_no_tta"] = images_per_second(lambda: predict_tta(model, inference, ("none",)), n)
    results["inference_flip_tta3"] = images_per_second(lambda: predict_tta(model, inference), n)
    ratio = results["jpeg_augmented_cache_memory"] / results["in_memory_tensors"]
    ratio_uncached = results["jpeg_augmented_cache_none"] / results["in_memory_tensors"]
    write_json(
        {**provenance(), "recipe": {k: str(v) for k, v in vars(args).items()}, "images_per_second": results,
         "ratio_pipeline_over_in_memory": ratio, "ratio_uncached_over_in_memory": ratio_uncached, "target_ratio": 0.95},
        ROOT / "bench" / "results" / "pipeline_speed.json",
    )
    for name, value in results.items():
        print(f"{name:32s} {value:8.1f} images/s")
    print(f"(a)/(b) real pipeline (cache memory) / in-memory tensors: {ratio:.3f}; uncached: {ratio_uncached:.3f}")


if __name__ == "__main__":
    main()
