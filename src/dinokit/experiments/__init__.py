"""`dinokit experiment`: the paper's findings reproduced by one command each, through the normal training loop.

- `dinokit experiment collapse`: centering only, sharpening only, both (the paper's Figure 7).
- `dinokit experiment teacher`: a momentum teacher, a copy of the student, the previous epoch's student
  (the paper's Figure 6 and Table 10).

Each writes one run folder per arm, `report.md` with its figure, and a JSON summary into `--out`, within
`--budget` (docs/experiments.md).
"""


def register(sub):
    from . import collapse, teacher

    p = sub.add_parser("experiment", help="reproduce one of the paper's findings: collapse, teacher")
    experiments = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    collapse.register(experiments)
    teacher.register(experiments)
