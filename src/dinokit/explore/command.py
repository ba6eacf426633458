"""`dinokit explore`: serve the explorer page on this machine (127.0.0.1 unless another address is asked for).

The web stack (Starlette, uvicorn) is the `explore` extra; without it the command says what to install."""
import socket
import sys

from .library import PROJECTIONS

MISSING_EXTRA = "dinokit explore needs its extra: pip install 'dinokit[explore]'"
ALL_ADDRESSES = ("0.0.0.0", "::", "")


def register(sub):
    p = sub.add_parser("explore", help="a local web page: attention heads, masks, PCA, neighbours, map, curves")
    p.add_argument("--weights", action="append", required=True, metavar="W",
                   help="weights as every command takes them; repeat to compare models side by side")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"),
                   help="network to take from a training checkpoint")
    p.add_argument("--data", help="images the page may show and open: a folder or a named source")
    p.add_argument("--index", help="a file from `dinokit index`: the neighbours and map views")
    p.add_argument("--run", help="a run folder: its metrics.jsonl as curves, live while it trains")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    p.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, mps")
    p.add_argument("--image-size", type=int, default=480,
                   help="larger images have their shorter side brought down to this (0: any size)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest upload accepted")
    p.add_argument("--projection", default="pca", choices=PROJECTIONS,
                   help="the map's projection (umap and tsne need umap-learn / scikit-learn)")
    p.set_defaults(func=run)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or a clear error when the address cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def run(args):
    try:
        import uvicorn

        from .server import LOCAL_HOSTS, create_app
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        return 2
    from .session import Explorer

    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be positive")
    explorer = Explorer(args.weights, args.which, args.device, args.data, args.index, args.run, args.image_size,
                        args.projection)
    if explorer.note:
        print(f"note: {explorer.note}", file=sys.stderr)
    everywhere = args.host in ALL_ADDRESSES
    hosts = ["*"] if everywhere else LOCAL_HOSTS + [args.host]
    app = create_app(explorer, round(args.max_upload_mb * 2**20), hosts)
    sock = listen(args.host, args.port)
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if everywhere else (f"[{args.host}]" if ":" in args.host else args.host)
    if everywhere:
        print("warning: listening on every address: anyone who can reach this machine can use the page",
              file=sys.stderr)
    print(f"dinokit explore: http://{shown}:{port}/  (Ctrl-C stops)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
