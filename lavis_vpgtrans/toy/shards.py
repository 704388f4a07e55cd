"""Toy-world image-caption pairs as webdataset tar shards in the LAION-COCO layout:
one sample per key with `jpg` (the image), `json` ({"caption": ...}) and `txt` (the caption),
as img2dataset writes them."""

import io
import json
import os
import random

from lavis_vpgtrans.toy import world


def write_caption_shards(out_dir: str, n_shards: int = 2, per_shard: int = 64, seed: int = 0) -> str:
    """Writes `n_shards` tars and returns their brace pattern relative to `out_dir`'s parent."""
    import webdataset as wds

    rng = random.Random(seed)
    os.makedirs(out_dir, exist_ok=True)
    for shard in range(n_shards):
        # a fixed mtime: the same seed writes the same bytes
        with wds.TarWriter(os.path.join(out_dir, f"{shard:05d}.tar"), mtime=0) as sink:
            for i in range(per_shard):
                scene = world.sample_scene(rng)
                caption = world.captions(scene, rng)[0]
                buf = io.BytesIO()
                world.render(scene).save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"{shard:05d}{i:04d}", "jpg": buf.getvalue(),
                            "json": json.dumps({"caption": caption}).encode(), "txt": caption.encode()})
    return f"{os.path.basename(out_dir)}/{{00000..{n_shards - 1:05d}}}.tar"
