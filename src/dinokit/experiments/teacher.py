"""`dinokit experiment teacher`: which teacher (the paper's Figure 6 and Table 10), three short runs.

- a momentum teacher (the paper's EMA), its k-NN and its student's checked during training: in the paper
  the teacher is better than the student throughout;
- a teacher that copies the student at every step (momentum 0): in the paper it fails to learn (0.1% k-NN);
- the previous epoch's student as the teacher: in the paper it learns, less well than the momentum teacher.

The runs train on a seeded subset of the training images (`--train-subset`, 4,800 by default: 150 steps of
batch 32 per epoch), so that a short run sees many epochs (about 20 in a 10-minute budget) and the
previous-epoch teacher is replaced that many times. All three train on the same subset, with the `fmnist-cpu`
preset and the paper's ViT head, without BatchNorm (its KoLeo term included: with the paper's loss alone the
model barely learns at this scale, see docs/experiments.md; `--set koleo_weight=0` runs the paper's loss).
The k-NN is checked at the same steps in every run, placed in the middle of epochs: at an epoch's end the
previous-epoch teacher has just become the student.
"""
from pathlib import Path

import numpy as np

from .common import (Arm, add_common_args, base_config, finish, machine, make_plan, markdown_table, pyplot, run_arms,
                     save_figure, series, start, tail_mean, write_subset)

# The verdict's thresholds, in k-NN top-1 points (docs/experiments.md).
LEAD = 1.0  # the teacher beat the student when its mean lead over the checks is at least this (and lost at -LEAD)
LEARNED = 2.0  # a run learned when its teacher ends at least this far above the k-NN at initialisation

ARMS = [Arm("momentum", "momentum teacher", {"teacher": "ema"}, student_knn=True),
        Arm("copy", "copy of the student", {"teacher": "student"}),  # its teacher is its student: one check
        Arm("previous_epoch", "previous-epoch teacher", {"teacher": "previous_epoch"}, student_knn=True)]


def register(sub):
    p = sub.add_parser("teacher", help="momentum teacher, copy of the student, previous epoch (Fig. 6, Table 10)")
    add_common_args(p, "3 runs")
    p.add_argument("--train-subset", type=int, default=4800,
                   help="train on this many images of --data (a seeded choice) so that several epochs fit; "
                        "0: all of them (default 4800)")
    p.add_argument("--checks", type=int, default=8, help="k-NN checks per run, the last at its end (default 8)")
    p.set_defaults(func=run)


def check_steps(n: int, per_epoch: int, checks: int) -> list[int]:
    """`checks - 1` steps spread over an n-step run (the last check is at its end), each in the middle of an
    epoch.

    >>> check_steps(3000, 150, 4)
    [825, 1575, 2325]
    """
    steps = []
    for j in range(1, checks):
        s = n * j / checks
        s = int((s // per_epoch + 0.5) * per_epoch) if per_epoch >= 2 else int(s)
        if 0 < s < n and s not in steps:
            steps.append(s)
    return steps


def summarise(runs: dict[str, dict], init_knn: float) -> dict:
    """Each arm's k-NN (teacher, student) at its checks and end; the teacher's lead; the verdicts."""
    arms = {}
    for arm in ARMS:
        rows = runs[arm.name]["rows"]
        steps, teacher = series(rows, "knn_top1")
        student = series(rows, "knn_top1_student")[1] if arm.student_knn else teacher
        leads = [t - s for t, s in zip(teacher, student)]
        arms[arm.name] = {"steps": runs[arm.name]["steps"], "seconds": round(runs[arm.name]["seconds"], 1),
                          "check_steps": steps, "knn_teacher": teacher, "knn_student": student,
                          "final_teacher": teacher[-1], "final_student": student[-1], "best_teacher": max(teacher),
                          "mean_lead": float(np.mean(leads)), "checks_won": sum(d > 0 for d in leads),
                          "learned": teacher[-1] >= init_knn + LEARNED,
                          "teacher_entropy": tail_mean(rows, "teacher_entropy", 0.2),
                          "kl": tail_mean(rows, "kl", 0.2)}
    lead = arms["momentum"]["mean_lead"]
    beat = "teacher" if lead >= LEAD else "student" if lead <= -LEAD else "neither"
    copy_failed = not arms["copy"]["learned"]
    return {"arms": arms, "init_knn": init_knn, "momentum_winner": beat, "copy_failed": copy_failed,
            "teacher_beat_student": beat == "teacher",
            "held": beat == "teacher" and copy_failed and arms["previous_epoch"]["learned"]}


def figure(runs: dict[str, dict], summary: dict, out: Path) -> Path:
    """k-NN against the step: the momentum teacher and its student (the paper's Figure 6, left); every run's
    teacher, and the previous-epoch run's student (right)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    colors = {"momentum": "tab:blue", "copy": "tab:red", "previous_epoch": "tab:green"}
    init = summary["init_knn"]
    for arm in ARMS:
        a = summary["arms"][arm.name]
        steps = [0] + a["check_steps"]
        right.plot(steps, [init] + a["knn_teacher"], color=colors[arm.name], marker=".", lw=1.4,
                   label=f"{arm.label}: teacher")
        if arm.student_knn:
            right.plot(steps, [init] + a["knn_student"], color=colors[arm.name], ls="--", lw=1, alpha=0.7,
                       label=f"{arm.label}: student")
    a = summary["arms"]["momentum"]
    left.plot([0] + a["check_steps"], [init] + a["knn_teacher"], color="tab:blue", marker=".", lw=1.4,
              label="teacher")
    left.plot([0] + a["check_steps"], [init] + a["knn_student"], color="tab:purple", marker=".", ls="--", lw=1.4,
              label="student")
    left.set_title("momentum teacher and its student")
    right.set_title("teachers")
    left.set_ylabel("k-NN top-1 (%)")
    for ax in (left, right):
        ax.legend(fontsize=7)
    return save_figure(fig, (left, right), out / "teacher.png")


def verdict_line(summary: dict) -> str:
    m, c, p = (summary["arms"][k] for k in ("momentum", "copy", "previous_epoch"))
    who = {"teacher": "the momentum teacher beat its student", "student": "the student beat its momentum teacher",
           "neither": "the momentum teacher and its student were level"}[summary["momentum_winner"]]
    return (f"{who} (mean lead {m['mean_lead']:+.2f} points over {len(m['knn_teacher'])} checks, ahead at "
            f"{m['checks_won']}; final {m['final_teacher']:.2f} against {m['final_student']:.2f}); the copy of the "
            f"student {'failed to learn' if summary['copy_failed'] else 'learned'} (final {c['final_teacher']:.2f}%,"
            f" from {summary['init_knn']:.2f}% at initialisation); the previous-epoch teacher "
            f"{'learned' if p['learned'] else 'did not learn'} ({p['final_teacher']:.2f}%).")


def report(summary: dict, cfg, plan, command: str, figure_name: str) -> str:
    rows = [[arm.label, f"{a['final_teacher']:.2f}", f"{a['final_student']:.2f}" if arm.student_knn else "(same)",
             f"{a['best_teacher']:.2f}", f"{a['mean_lead']:+.2f}" if arm.student_knn else "-",
             f"{a['checks_won']} of {len(a['knn_teacher'])}" if arm.student_knn else "-",
             f"{a['teacher_entropy']:.2f}", f"{a['kl']:.3f}", "yes" if a["learned"] else "no"]
            for arm in ARMS for a in [summary["arms"][arm.name]]]
    table = markdown_table(["teacher", "final k-NN, teacher", "final k-NN, student", "best teacher",
                            "teacher - student (mean)", "checks teacher ahead", "teacher entropy", "KL",
                            "learned"], rows)
    checks = summary["arms"]["momentum"]["check_steps"]
    held = "held" if summary["held"] else "did not hold"
    return f"""# Teachers: momentum, a copy of the student, the previous epoch (the paper's Figure 6 and Table 10)

`{command}`

Machine: {machine()}. Whole experiment: {summary['seconds']:.0f} s{summary['budget_note']}.
Base configuration: preset `{summary['preset']}`, trained on {summary['data']} ({plan.steps_per_epoch} steps of
batch {cfg.batch_size} per epoch), KoLeo weight {cfg.koleo_weight:g}, teacher momentum {cfg.momentum_teacher:g}
to 1, {cfg.precision} on {cfg.threads} thread(s), seed {cfg.seed}. Steps per run: {plan.steps} ({plan.reason}),
{plan.steps / plan.steps_per_epoch:.1f} epochs. k-NN: weighted, k = 20, [CLS] features, {summary['knn']},
checked at steps {', '.join(map(str, checks))}; at initialisation (every run's starting weights)
{summary['init_knn']:.2f}%.

{table}

Teacher entropy and KL: means over the last 20% of each run's logged steps.
Thresholds (`dinokit/experiments/teacher.py`): the teacher beat the student when its k-NN lead, averaged over
the checks, is at least {LEAD} point; a run learned when its teacher ends at least {LEARNED} points above the
k-NN at initialisation.

**Verdict: the paper's qualitative result {held}.** {summary['verdict'][:1].upper() + summary['verdict'][1:]}

![k-NN top-1 against the step]({figure_name})
"""


def run(args) -> int:
    if args.checks < 1:
        raise ValueError("--checks must be >= 1")
    if args.train_subset < 0:
        raise ValueError("--train-subset must be >= 0 (0: all of --data)")
    session = start(args, ARMS)
    data = args.data
    if args.train_subset:
        folder = session.out / "train-subset"
        if not folder.is_dir():  # a re-run into the same folder reuses it (the choice is seeded)
            folder.mkdir(parents=True)
            write_subset(args.data, args.train_subset, 0, folder)
        data = str(folder)
    # the paper's ViT head, and every step on the same views (the published numbers' configuration)
    cfg = base_config(args.preset, args.sets, data, {"use_bn_in_head": False, "early_crops_share": 0.0})
    cfg, plan = make_plan(cfg, ARMS, session.budget, args.steps, args.checks, session.knn, session.started,
                          session.log)
    runs = run_arms(cfg, ARMS, plan, session.out, session.knn,
                    lambda n: check_steps(n, plan.steps_per_epoch, args.checks), session.budget, session.started,
                    session.log, not args.no_progress)
    summary = summarise(runs, plan.init_knn)
    summary.update(data=f"{args.train_subset} images of {args.data} (seed 0)" if args.train_subset else args.data,
                   thresholds={"lead": LEAD, "learned": LEARNED})
    summary["verdict"] = verdict_line(summary)
    table = markdown_table(["teacher", "final k-NN teacher", "final k-NN student", "teacher - student (mean)"],
                           [[a, f"{s['final_teacher']:.2f}", f"{s['final_student']:.2f}", f"{s['mean_lead']:+.2f}"]
                            for a, s in summary["arms"].items()])
    return finish("teacher", args, session, plan, summary, lambda out: figure(runs, summary, out),
                  lambda s, command, name: report(s, cfg, plan, command, name), table)
