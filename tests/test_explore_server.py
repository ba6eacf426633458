"""`dinokit explore` without a browser: every endpoint through Starlette's test client (and a real uvicorn
server for the parallel requests and the command itself), on tiny random ViTs and generated class folders.
`make_world` and `serve` are shared with test_explore_browser.py."""
import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("starlette", reason="dinokit explore's extra (starlette, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="dinokit explore's extra (starlette, uvicorn) is not installed")
pytest.importorskip("httpx", reason="Starlette's test client needs httpx")
from starlette.testclient import TestClient  # noqa: E402
from test_eval_common import save_vit, tiny_vit  # noqa: E402

import dinokit.explore  # noqa: E402
from dinokit import cli  # noqa: E402
from dinokit.data.decode import decode_image  # noqa: E402
from dinokit.eval.attention import cls_attention, mass_mask  # noqa: E402
from dinokit.eval.common import load_model  # noqa: E402
from dinokit.eval.features import MEAN, STD  # noqa: E402
from dinokit.eval.search import load_index, search  # noqa: E402
from dinokit.explore.command import MISSING_EXTRA, listen  # noqa: E402
from dinokit.explore.maps import MAX_PATCHES, model_input  # noqa: E402
from dinokit.explore.server import create_app  # noqa: E402
from dinokit.explore.session import Explorer  # noqa: E402

CLASSES = ("circles", "squares", "stripes")
PER_CLASS = 8
OCTET = {"content-type": "application/octet-stream"}


def shape_image(kind: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A noisy background with one shape of the class, somewhere: images a model can tell apart."""
    pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(pixels)
    draw = ImageDraw.Draw(im)
    colour = tuple(int(c) for c in rng.integers(120, 256, 3))
    x, y = (int(v) for v in rng.integers(4, size // 2, 2))
    side = int(rng.integers(size // 3, size // 2))
    if kind == "circles":
        draw.ellipse((x, y, x + side, y + side), fill=colour)
    elif kind == "squares":
        draw.rectangle((x, y, x + side, y + side), fill=colour)
    else:
        for row in range(0, size, 8):
            draw.rectangle((0, row, size, row + 3), fill=colour)
    return im


def sharpened_vit(seed: int, **arch):
    """A random ViT with weights 3x the init's: attention peaks on some patches, as a trained one's does."""
    model = tiny_vit(seed, **arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and name not in ("pos_embed", "cls_token"):
                p.mul_(3)
    return model


def make_world(root: Path) -> SimpleNamespace:
    """Two checkpoints (3 and 4 heads), a folder of images in class folders, its index (by `dinokit index`,
    with the first checkpoint), a run folder with metrics.jsonl, a query image and a secret beside --data."""
    rng = np.random.default_rng(0)
    data = root / "data"
    for kind in CLASSES:
        (data / kind).mkdir(parents=True)
        for i in range(PER_CLASS):
            shape_image(kind, rng).save(data / kind / f"{kind}{i}.png")
    query = root / "query.png"
    shape_image("circles", rng, 56).save(query)
    weights = [save_vit(sharpened_vit(0), root / "step2000.safetensors"),
               save_vit(sharpened_vit(1, num_heads=4), root / "step20000.safetensors")]
    index = root / "index.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["index", "--weights", str(weights[0]), "--data", str(data), "--out", str(index)]) == 0
    run = root / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(0, 300, 10):
            f.write(json.dumps({"step": step, "loss": 10 * np.exp(-step / 100) + 1, "lr": 1e-3 * step / 300,
                                "teacher_entropy": 3 - step / 150, "images_per_s": 400 + step % 7}) + "\n")
    (root / "secret.png").write_bytes(query.read_bytes())
    return SimpleNamespace(root=root, data=data, query=query, weights=[str(w) for w in weights], index=index,
                           run=run, secret=root / "secret.png")


def make_explorer(world: SimpleNamespace, **kw) -> Explorer:
    return Explorer(world.weights, device="cpu", data=str(world.data), index=str(world.index), run=str(world.run),
                    **kw)


@contextlib.contextmanager
def serve(app):
    """A real uvicorn server for `app` on a free loopback port, in a thread; yields its base URL."""
    import uvicorn
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def decode_data_url(url: str) -> np.ndarray:
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("explore"))


@pytest.fixture(scope="module")
def explorer(world):
    return make_explorer(world)


@pytest.fixture(scope="module")
def client(explorer):
    return TestClient(create_app(explorer, allowed_hosts=["testserver"]))


def upload(client, data: bytes, name: str = "query.png"):
    return client.post(f"/api/upload?name={name}", content=data, headers=OCTET)


def test_page_and_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js">' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    static = Path(dinokit.explore.__file__).parent / "static"
    assets = ["/"] + [f"/static/{p.name}" for p in sorted(static.iterdir())]
    assert {"/static/core.js", "/static/app.js", "/static/style.css"} <= set(assets)
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text, f"{asset} loads something from outside"
        if asset.endswith(".js"):
            assert f'<script src="{asset}">' in page.text


def test_info_lists_the_command_line_models(client, world):
    info = client.get("/api/info").json()
    assert [m["name"] for m in info["models"]] == world.weights
    assert [m["heads"] for m in info["models"]] == [3, 4] and [m["layers"] for m in info["models"]] == [2, 2]
    assert info["data"]["count"] == info["index"]["count"] == len(CLASSES) * PER_CLASS
    assert info["index"]["model"] == 0 and info["index"]["note"] is None  # the index's own model was given


def test_upload_shows_every_head_and_the_masks_of_dinokit_attention(client, world):
    looked = upload(client, world.query.read_bytes()).json()
    assert [m["heads"] for m in looked["models"]] == [3, 4] and looked["size"] == [56, 56]
    for i, weights in enumerate(world.weights):
        model = load_model(weights)
        x = model_input(decode_image(str(world.query)), 480, model.patch_size)
        attn = cls_attention(model, (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1))
        last = client.get(f"/api/view?id={looked['id']}&model={i}&layer=-1&threshold=0.6").json()
        assert last["layer"] == 1 and len(last["heads"]) == model.num_heads
        for head, expected in zip(last["heads"], mass_mask(attn, 0.6)):
            kept = decode_data_url(head["mask"])[..., 3] == 0  # clear where the mask keeps the patch
            assert np.array_equal(kept, expected.numpy())
            assert head["fraction"] == pytest.approx(expected.float().mean().item())
            assert decode_data_url(head["heat"]).shape == (7, 7, 3)  # 56 px / patch 8: the patch grid
        assert decode_data_url(last["pca"]).shape == (7, 7, 3)
        first = client.get(f"/api/view?id={looked['id']}&model={i}&layer=0&threshold=0.6").json()
        assert [h["heat"] for h in first["heads"]] != [h["heat"] for h in last["heads"]]


def test_large_images_are_brought_to_a_bounded_patch_count(client):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 1200, 3), dtype=np.uint8)).save(buf, "PNG")
    looked = upload(client, buf.getvalue(), "wide.png").json()
    assert looked["size"] == [300, 1200]
    for m in looked["models"]:  # 37 x 150 patches of 8 pixels would be 5,550: over MAX_PATCHES
        assert m["grid"][0] * m["grid"][1] <= MAX_PATCHES and m["grid"][0] * m["grid"][1] > MAX_PATCHES * 0.9
        assert m["grid"][1] / m["grid"][0] == pytest.approx(4, rel=0.05)


def test_threshold_moves_the_masks(client, world):
    key = upload(client, world.query.read_bytes()).json()["id"]
    low, high = (client.get(f"/api/view?id={key}&model=1&layer=-1&threshold={t}").json() for t in (0.3, 0.9))
    fractions = [(a["fraction"], b["fraction"]) for a, b in zip(low["heads"], high["heads"])]
    assert all(a < b for a, b in fractions), fractions


def test_bad_view_parameters_are_clear_errors(client, world):
    key = upload(client, world.query.read_bytes()).json()["id"]
    for query, status, words in [(f"id={key}&threshold=0", 400, "threshold"), (f"id={key}&layer=7", 400, "layer"),
                                 (f"id={key}&model=2", 400, "model"), (f"id={key}&layer=x", 400, "integer"),
                                 ("id=nothing", 410, "open it again")]:
        r = client.get(f"/api/view?{query}")
        assert r.status_code == status and words in r.json()["error"], (query, r.text)


def test_only_images_under_data_are_served(client, world):
    notes, link = world.data / "notes.txt", world.data / "circles" / "link.png"
    notes.write_text("not for the page")
    link.symlink_to(world.secret)  # inside the folder, resolving outside it
    try:
        refused = ["../secret.png", str(world.secret), "circles/../../secret.png", "circles/link.png", "notes.txt",
                   ""]
        for ref in refused:
            for r in (client.get("/api/data/image", params={"ref": ref}),
                      client.post("/api/open", params={"ref": ref})):
                assert r.status_code == 403 and "error" in r.json(), (ref, r.status_code)
        for raw in ("%2e%2e%2fsecret.png", "%2E%2E/secret.png", "circles%2F..%2F..%2Fsecret.png"):  # as sent
            r = client.get(f"/api/data/image?ref={raw}")
            assert r.status_code == 403 and "outside --data" in r.json()["error"], raw
    finally:
        notes.unlink()
        link.unlink()
    assert client.get("/api/data/image", params={"ref": "../secret.png"}).json()["error"].endswith("outside --data")
    assert client.get("/api/data/image", params={"ref": "circles/none.png"}).status_code == 404
    good = client.get("/api/data/image", params={"ref": "squares/squares3.png", "max": 24})
    assert good.status_code == 200 and good.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(good.content)).size == (24, 24)
    listing = client.get("/api/data?offset=20&limit=500").json()
    assert listing["total"] == len(CLASSES) * PER_CLASS and len(listing["items"]) == listing["total"] - 20
    assert [i["class"] for i in listing["items"]] == ["stripes"] * 4
    assert client.post("/api/open", params={"ref": "stripes/stripes0.png"}).status_code == 200


def test_oversized_upload_is_refused_and_the_server_goes_on(explorer, world):
    good = world.query.read_bytes()
    limited = TestClient(create_app(explorer, max_upload=len(good) + 10, allowed_hosts=["testserver"]))
    big = good + bytes(64)
    r = upload(limited, big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    chunked = limited.post("/api/upload", content=iter([big[:1000], big[1000:]]), headers=OCTET)  # no length
    assert chunked.status_code == 413
    huge = upload(limited, bytes(100 * len(good)))  # far over: refused from its Content-Length
    assert huge.status_code == 413
    assert upload(limited, good).status_code == 200


def test_non_image_uploads_are_clear_errors(client, world):
    png = world.query.read_bytes()
    for body, words in [(b"%PDF-1.4 not a picture", "not an image"), (png[:len(png) // 2], "corrupt or truncated"),
                        (b"", "empty")]:
        r = upload(client, body, "bad.png")
        assert r.status_code == 400 and r.json()["error"].startswith("not a usable image") and words in r.text
    form = client.post("/api/upload", content=png, headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415  # a type a cross-site form can send: refused
    assert upload(client, png).status_code == 200


def test_neighbours_are_dinokit_searchs(client, world):
    k = 10
    expected = search(str(world.index), [str(world.query)], k=k)[0]["results"]
    key = upload(client, world.query.read_bytes()).json()["id"]
    got = client.get(f"/api/neighbours?id={key}&k={k}").json()["results"]
    assert [(m["path"], m["similarity"]) for m in got] == [(m["path"], m["similarity"]) for m in expected]
    assert [m["rank"] for m in got] == list(range(1, k + 1))
    assert all(m["ref"] == str(Path(m["path"]).relative_to(world.data)) for m in got)
    picked = world.data / "squares" / "squares2.png"
    key = client.post("/api/open", params={"ref": "squares/squares2.png"}).json()["id"]
    got = client.get(f"/api/neighbours?id={key}&k=5").json()["results"]
    assert [m["path"] for m in got] == [m["path"] for m in search(str(world.index), [str(picked)], k=5)[0]["results"]]
    assert got[0]["path"] == str(picked) and got[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert client.get(f"/api/neighbours?id={key}&k=0").status_code == 400


def test_map_projects_every_indexed_image_with_its_class(client, world):
    m = client.get("/api/map").json()
    features, paths, _ = load_index(world.index)
    assert m["count"] == len(m["points"]) == len(paths) and m["method"] == "pca"
    assert m["classes"] == sorted(CLASSES)
    for p in m["points"]:
        assert m["classes"][p["class"]] == Path(p["path"]).parent.name
        assert p["ref"] == str(Path(p["path"]).relative_to(world.data))
    coords = torch.tensor([[p["x"], p["y"]] for p in m["points"]], dtype=torch.float64)
    centred = features.double() - features.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    expected = centred @ vh[:2].T  # the two leading principal axes, up to their signs
    torch.testing.assert_close(coords.abs(), expected.abs(), atol=2e-5, rtol=0)


def test_unavailable_projection_says_what_to_install(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # importing it fails, whether or not it is installed
    with pytest.raises(ValueError, match="umap-learn"):
        make_explorer(world, projection="umap")


def test_index_of_other_weights_is_noted_or_refused(world, tmp_path):
    other = save_vit(sharpened_vit(1, num_heads=4), tmp_path / "other.safetensors")
    ex = Explorer([str(other)], device="cpu", index=str(world.index))
    assert ex.note and "step2000" in ex.note
    wide = save_vit(tiny_vit(2, embed_dim=64, num_heads=4), tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="64-d"):
        Explorer([str(wide)], device="cpu", index=str(world.index))


def test_run_metrics_update_live(client, world):
    path = world.run / "metrics.jsonl"
    original = path.read_text()
    try:
        first = client.get("/api/metrics").json()
        n = first["total"]
        assert n == 30 and first["rows"][-1]["step"] == 290
        with open(path, "a") as f:
            f.write(json.dumps({"step": 300, "loss": 1.5}) + "\n")
            f.write('{"step": 310, "lo')  # the trainer is half-way through writing a line
            f.flush()
            torn = client.get(f"/api/metrics?after={n}").json()  # read while torn: no error, no row lost
            assert torn["total"] == n and torn["rows"] == []
            f.write('ss": 1.4}\n')
        grown = client.get(f"/api/metrics?after={n}").json()
        assert grown["total"] == n + 2 and [r["step"] for r in grown["rows"]] == [300, 310]
        path.write_text(original.splitlines(keepends=True)[0])  # a new run rewrote the file
        restarted = client.get(f"/api/metrics?after={n + 2}").json()
        assert restarted["from"] == 0 and restarted["total"] == 1
    finally:
        path.write_text(original)


def test_foreign_host_names_are_refused(explorer):
    local = TestClient(create_app(explorer), base_url="http://127.0.0.1:8000")
    assert local.get("/api/info").status_code == 200
    assert local.get("/api/info", headers={"host": "attacker.example"}).status_code == 400  # DNS rebinding


def test_fifty_parallel_requests_all_succeed(explorer, world):
    body = world.query.read_bytes()
    with serve(create_app(explorer)) as url:
        key = json.load(urllib.request.urlopen(urllib.request.Request(
            f"{url}/api/upload?name=q.png", data=body, headers=OCTET)))["id"]
        requests = [f"/api/view?id={key}&model={i % 2}&layer={i % 2}&threshold=0.{i % 9 + 1}" for i in range(20)]
        requests += [f"/api/data/image?ref={c}/{c}{i % PER_CLASS}.png&max=32" for i, c in enumerate(CLASSES * 4)]
        requests += [f"/api/neighbours?id={key}&k=5"] * 5 + ["/", "/static/app.js", "/api/map", "/api/metrics",
                                                              "/api/info"]
        requests += ["upload"] * (50 - len(requests))

        def fetch(path):
            request = urllib.request.Request(f"{url}/api/upload?name=q.png", data=body, headers=OCTET) \
                if path == "upload" else f"{url}{path}"
            try:
                with urllib.request.urlopen(request, timeout=60) as r:
                    return r.status, len(r.read())
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        assert len(requests) == 50
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(fetch, requests))
    failed = [(p, r) for p, r in zip(requests, results) if r[0] != 200 or not r[1]]
    assert not failed


def test_missing_extra_is_one_clear_line(world, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert cli.main(["explore", "--weights", world.weights[0]]) == 2
    assert capsys.readouterr().err.strip() == MISSING_EXTRA


def test_command_serves_on_loopback(world, tmp_path):
    code = cli.main(["explore", "--weights", str(tmp_path / "missing.pt")])
    assert code == 2  # a user error: one line, no traceback
    args = cli.build_parser().parse_args(["explore", "--weights", "w"])
    assert args.host == "127.0.0.1"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "dinokit", "explore", "--weights", world.weights[0],
                             "--weights", world.weights[1], "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("dinokit explore: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[2]
        info = json.load(urllib.request.urlopen(f"{url}api/info", timeout=30))
        assert [m["name"] for m in info["models"]] == world.weights and info["index"] is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
