"""The state behind the page, free of any web code: the models named on the command line, the images
looked at so far (a bounded cache), the index and its map, the run folder.

Weights come only from here (the command line); a request can name an image, never a model file."""
import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import pick_device
from ..eval.common import load_model, require_vit
from ..eval.search import embed, load_index, nearest
from ..train.monitor import read_metrics
from .library import DataImages, IndexMap, check_projection
from .maps import image_pixels, layer_maps, model_input, png_data_url, render_layer

MAX_NEIGHBOURS = 200


class Gone(Exception):
    """An image id the server no longer (or never) held; str(e) is the reason."""


class InMemoryImage:
    """One decoded image as a source for `embed` (what `dinokit search` reads from a file)."""

    def __init__(self, name: str, img: torch.Tensor):
        self.paths, self.img, self.name, self.labels = [name], img, name, None

    def __len__(self):
        return 1

    def read(self, i: int) -> torch.Tensor:
        return self.img


@dataclass
class Looked:
    """One image as every model saw it: per model the input, attention and PCA colours of each block."""
    name: str
    inputs: list[torch.Tensor]
    attention: list[torch.Tensor]
    colours: list[torch.Tensor]
    query: torch.Tensor | None  # the index model's embedding, as `dinokit search` makes it


class Explorer:
    """Everything `dinokit explore` serves.

    >>> ex = Explorer(["runs/x/checkpoint.pt"], data="photos/", index="photos.safetensors")
    >>> looked = ex.analyse(decode_image("cat.jpg"), "cat.jpg")
    >>> ex.view(looked["id"], model=0, layer=-1, threshold=0.6)["heads"][0]["fraction"]
    """

    def __init__(self, weights: list[str], which: str = "teacher", device: str = "cpu", data: str | None = None,
                 index: str | None = None, run: str | None = None, image_size: int = 480,
                 projection: str = "pca", keep: int = 32):
        if not weights:
            raise ValueError("give at least one --weights")
        check_projection(projection)
        if image_size < 0:
            raise ValueError("--image-size must be 0 (keep) or positive")
        self.device = pick_device(device)
        self.names, self.models = self._unique_names(weights), []
        self.labels = self._labels(self.names)
        for w in weights:
            model = load_model(w, which)
            require_vit(model, f"--weights {w}: the attention view")
            self.models.append(model.to(self.device))
        self.which, self.image_size, self.projection, self.keep = which, image_size, projection, keep
        self.data = DataImages(data) if data else None
        self.run = Path(run) if run else None
        if self.run is not None and not self.run.is_dir():
            raise FileNotFoundError(f"--run {run}: no such folder")
        self.index_path, self.index_model, self.note = index, 0, None
        if index:
            self.index_features, self.index_paths, recorded = load_index(index)
            self.index_model = self._model_for_index(weights, recorded)
            width = self.models[self.index_model].num_features
            if width != self.index_features.shape[1]:
                raise ValueError(f"--index {index} holds {self.index_features.shape[1]}-d features but "
                                 f"--weights {weights[self.index_model]} makes {width}-d ones")
        self._looked: OrderedDict[str, Looked] = OrderedDict()
        self._lock, self._compute, self._map_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self._map: dict | None = None
        self._metrics: list[dict] = []

    @staticmethod
    def _labels(names: list[str]) -> list[str]:
        """Short names for the page: the fewest trailing path parts (two at least, e.g. `run/checkpoint.pt`)
        that tell the models apart."""
        parts = [Path(n).parts for n in names]
        for depth in range(2, max(len(p) for p in parts) + 1):
            labels = ["/".join(p[-depth:]) for p in parts]
            if len(set(labels)) == len(labels):
                return labels
        return names

    @staticmethod
    def _unique_names(weights: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        names = []
        for w in weights:
            seen[w] = seen.get(w, 0) + 1
            names.append(w if seen[w] == 1 else f"{w} ({seen[w]})")
        return names

    def _model_for_index(self, weights: list[str], recorded: dict) -> int:
        """The --weights the index was made with (its features match only that model's), else the first."""
        made_with = recorded.get("path")
        for i, w in enumerate(weights):
            if made_with and Path(w).resolve() == Path(made_with) and self.which == recorded.get("which", "teacher"):
                return i
        self.note = (f"the index was made with {made_with} ({recorded.get('which', 'teacher')}); its neighbours "
                     f"are searched with --weights {weights[0]} ({self.which})")
        return 0

    def info(self) -> dict:
        models = [{"name": n, "label": label, "layers": len(m.blocks), "heads": m.num_heads, "patch": m.patch_size}
                  for n, label, m in zip(self.names, self.labels, self.models)]
        return {"models": models,
                "data": {"spec": self.data.spec, "count": len(self.data)} if self.data else None,
                "index": ({"path": self.index_path, "count": len(self.index_paths), "model": self.index_model,
                           "note": self.note} if self.index_path else None),
                "run": str(self.run) if self.run else None, "threshold": 0.6}

    # ---- one image ------------------------------------------------------------------------------------

    def analyse(self, img: torch.Tensor, name: str) -> dict:
        """Look at a decoded uint8 (3, H, W) image with every model; its id serves `view` and `neighbours`."""
        inputs, attention, colours = [], [], []
        with self._compute:  # one image at a time: the cores are shared by the torch threads already
            for model in self.models:
                x = model_input(img, self.image_size, model.patch_size)
                a, c = layer_maps(model, x)
                inputs.append(x)
                attention.append(a)
                colours.append(c)
            query = None
            if self.index_path:
                query = embed(self.models[self.index_model], InMemoryImage(name, img), device=self.device)[0]
        looked = Looked(name[:200], inputs, attention, colours, query)
        key = uuid.uuid4().hex
        with self._lock:
            self._looked[key] = looked
            while len(self._looked) > self.keep:
                self._looked.popitem(last=False)
        return {"id": key, "name": looked.name, "size": list(img.shape[-2:]),
                "models": [{"name": n, "label": label, "image": png_data_url(image_pixels(x)),
                            "size": list(x.shape[-2:]), "grid": list(a.shape[-2:]), "layers": a.shape[0],
                            "heads": a.shape[1]}
                           for n, label, x, a in zip(self.names, self.labels, inputs, attention)]}

    def _get(self, key: str) -> Looked:
        with self._lock:
            looked = self._looked.get(key)
            if looked is None:
                raise Gone("this image is no longer held by the server: open it again")
            self._looked.move_to_end(key)
            return looked

    def view(self, key: str, model: int, layer: int, threshold: float) -> dict:
        """One model's maps of one block (negative layers count from the last) at a mass threshold."""
        looked = self._get(key)
        if not 0 <= model < len(self.models):
            raise ValueError(f"model must be 0..{len(self.models) - 1}")
        layers = looked.attention[model].shape[0]
        if not -layers <= layer < layers:
            raise ValueError(f"layer must be 0..{layers - 1} (or negative, from the last)")
        out = render_layer(looked.attention[model][layer], looked.colours[model][layer], threshold)
        return {"model": model, "layer": layer % layers, **out}

    def neighbours(self, key: str, k: int = 10) -> dict:
        """The k indexed images nearest to a looked-at image: `dinokit search`'s features, `nearest`, order."""
        if not self.index_path:
            raise FileNotFoundError("no --index given")
        if not 1 <= k <= MAX_NEIGHBOURS:
            raise ValueError(f"k must be 1..{MAX_NEIGHBOURS}")
        looked = self._get(key)
        sims, idx = nearest(self.index_features, looked.query, k)
        results = []
        for rank, (s, j) in enumerate(zip(sims[0].tolist(), idx[0].tolist()), 1):
            path = self.index_paths[j]
            results.append({"rank": rank, "path": path, "similarity": round(s, 6),
                            "ref": self.data.ref_for(path) if self.data else None})
        return {"query": looked.name, "model": self.labels[self.index_model], "results": results}

    # ---- the index map and the run ----------------------------------------------------------------------

    def map(self) -> dict:
        """The index's points in 2-D, made on first use (UMAP and t-SNE take a while on large indexes)."""
        if not self.index_path:
            raise FileNotFoundError("no --index given")
        with self._map_lock:
            if self._map is None:
                self._map = IndexMap(self.index_paths, self.index_features, self.data, self.projection).as_json()
        return self._map

    def metrics(self, after: int = 0) -> dict:
        """The rows of the run's metrics.jsonl from row `after` on (the page polls it while the run trains)."""
        if self.run is None:
            raise FileNotFoundError("no --run given")
        try:
            rows = read_metrics(self.run)
        except json.JSONDecodeError:  # caught while the trainer writes a line: the rows read before stand
            rows = self._metrics
        self._metrics = rows
        if after > len(rows):  # a new run overwrote the file: start over
            after = 0
        return {"run": str(self.run), "total": len(rows), "from": after, "rows": rows[after:]}
