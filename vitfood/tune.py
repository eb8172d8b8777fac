"""Search vitfood.train's options with Optuna: each trial a vitfood run of its own, the study in a database.

    python -m vitfood.tune --study lr --trials 12 --search lr=1e-5:1e-3:log --search label_smoothing=0,0.1 \\
        --dataset ./photos --model google/vit-base-patch16-224-in21k --max-steps 600 --eval-steps 100

--search NAME=SPEC, once per option: LOW:HIGH (a range; an integer option gets integers), LOW:HIGH:log (on a log
scale), or A,B,C (choices). Every other flag is vitfood.train's, the same for every trial. Each trial trains in
STUDY_DIR/trial-<n> (a TensorBoard run, with its options in HParams), reports its score (top-1, or mAP) at each eval,
and is stopped there, as a user stops a run (it saves first), when the pruner says it trails the others. The study
is kept in STUDY_DIR/study.db (SQLite), or with --storage in any database SQLAlchemy reaches (PostgreSQL, MySQL):
the same command started on several machines then shares one study, each trial run once.

Killed (kill -9 included) and started again with the same command, the search goes on: finished and pruned trials
stay as they are, an interrupted trial resumes from its last checkpoint (the worker that can reach its folder takes
it up), and the study ends with --trials trials. A trial that fails for a reason of its own (options that do not go
together) is recorded with its one-line reason, and the search goes on. At the end: STUDY_DIR/summary.json and the
best trial, with the command line that trains it again.
"""

import vitfood
import vitfood.stack

if __name__ == "__main__":
    vitfood.quiet_ctrl_c()
vitfood.stack.require(__name__)

import argparse
import dataclasses
import gc
import json
import os
import shlex
import time

from vitfood import config, metrics, rundir
from vitfood.common import UserError, first_line, run_main, safe_name
from vitfood.config import Config, OneLineParser, check_option

OWN = ("output_dir", "resume")  # the tuner sets these for each trial
PRUNED = "the tuner (pruned: its evals trail the study's other trials at the same step)"


@dataclasses.dataclass(frozen=True)
class Space:
    """One --search: an option of vitfood.train and what the sampler may give it."""
    name: str
    low: object = None
    high: object = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def typed(name, text):
    """`text` as option `name` of vitfood.train takes it (its own flag's parser: the type and choices), checked by
    the option's rule."""
    if name not in {f.name for f in dataclasses.fields(Config)} or name in OWN:
        raise UserError(f"--search {name}: vitfood.train has no option {name!r} to search")
    field = next(f for f in dataclasses.fields(Config) if f.name == name)
    if field.type in (bool, "bool"):
        value = {"true": True, "false": False}.get(text.lower())
        if value is None:
            raise UserError(f"--search {name}: {text!r} is not true or false")
    else:
        value = getattr(config.build_parser().parse_args([f"--{name.replace('_', '-')}", text]), name)
    check_option(name, value)
    return value


def parse_search(spec):
    """A Space from NAME=LOW:HIGH[:log] or NAME=A,B,C; one line when it is not one."""
    name, sep, values = spec.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values:
        raise UserError(f"--search {spec}: give NAME=LOW:HIGH, NAME=LOW:HIGH:log or NAME=A,B,C")
    if ":" in values:
        parts = values.split(":")
        log = parts[-1] == "log"
        parts = parts[:-1] if log else parts
        if len(parts) != 2:
            raise UserError(f"--search {spec}: a range is LOW:HIGH or LOW:HIGH:log")
        low, high = (typed(name, p) for p in parts)
        if not isinstance(low, (int, float)) or isinstance(low, bool):
            raise UserError(f"--search {spec}: {name} is not a number; give its choices as A,B,C")
        if not low < high or (log and low <= 0):
            raise UserError(f"--search {spec}: the range needs LOW < HIGH{' and LOW > 0 on a log scale' if log else ''}")
        return Space(name, low, high, log)
    return Space(name, choices=tuple(typed(name, v) for v in values.split(",")))


def flags(values):
    """{option: value} as vitfood.train's command-line flags."""
    out = []
    for name, value in values.items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            out += [flag, str(value)]
    return out


def parse_args(argv):
    p = OneLineParser(prog="python -m vitfood.tune", description=__doc__, add_help=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-h", "--help", action="store_true")
    p.add_argument("--study", help="the study's name (in its database)")
    p.add_argument("--trials", type=int, default=20, help="trials in the study, over every worker (default 20)")
    p.add_argument("--search", action="append", default=[], metavar="NAME=SPEC",
                   help="an option to search: LOW:HIGH, LOW:HIGH:log, or A,B,C (repeat for each)")
    p.add_argument("--study-dir", help="where the trials' run folders go (default runs/tune-STUDY)")
    p.add_argument("--storage", help="an SQLAlchemy URL of the study's database (default: STUDY_DIR/study.db)")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="how trials are drawn (default tpe)")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                   help="when a trial is stopped at an eval for trailing the others (default median)")
    a, rest = p.parse_known_args(argv)
    if a.help:
        p.print_help()
        print("\nEvery other flag is vitfood.train's (python -m vitfood.train --help), the same for every trial.")
        raise SystemExit(0)
    if not a.study or not a.search:
        raise UserError("--study NAME and at least one --search NAME=SPEC are required")
    if a.trials < 1:
        raise UserError(f"--trials must be a positive integer, got {a.trials}")
    train = vars(config.build_parser().parse_args(rest))  # one line for a flag vitfood.train does not have
    if any(train.get(k) is not None for k in OWN):
        raise UserError("--output-dir and --resume are the tuner's to set: each trial is STUDY_DIR/trial-<n>")
    space = [parse_search(s) for s in a.search]
    if len({s.name for s in space}) < len(space):
        raise UserError("--search names an option twice")
    config.resolve(train)  # the fixed flags alone are sound (each option's rule, the rules between them)
    return a, rest, space


def open_study(a, rest, space, folder):
    """The Optuna study (created, or loaded when it exists), checked to be this search's."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = a.storage or f"sqlite:///{os.path.abspath(os.path.join(folder, 'study.db'))}"
    for attempt in range(10):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            break
        except Exception as e:
            if ("already exists" in str(e) or "locked" in str(e)) and attempt < 9:  # another worker creating the tables
                time.sleep(0.5)
                continue
            hint = " (PostgreSQL: pip install 'psycopg[binary]')" if "DB access module" in str(e) else ""
            raise UserError(f"cannot open --storage {a.storage or url}: {first_line(e, 200)}{hint}")
    sampler = optuna.samplers.RandomSampler() if a.sampler == "random" else optuna.samplers.TPESampler()
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2), "none": optuna.pruners.NopPruner(),
              "hyperband": optuna.pruners.HyperbandPruner()}[a.pruner]
    study = optuna.create_study(study_name=a.study, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    search = dict(search=sorted(a.search), train=rest, trials=a.trials)
    if not study.user_attrs.get("search"):
        study.set_user_attr("search", search)
    elif study.user_attrs["search"] != search:
        theirs = study.user_attrs["search"]
        raise UserError(f"study {a.study!r} in {a.storage or url} belongs to another search (--search "
                        f"{' --search '.join(theirs['search'])}; {shlex.join(theirs['train'])}; {theirs['trials']} "
                        "trials): give another --study")
    return study


def next_trial(study, trials, folder):
    """(a trial to run, whether it is resumed): an interrupted one whose folder this worker can lock first, else a
    new one while the study has fewer than `trials`; None when there is nothing left for this worker."""
    import optuna
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run = os.path.join(folder, f"trial-{t.number}")
        if t.number < trials and os.path.isdir(run):
            try:
                rundir.lock(run)  # held from here: another worker sees it taken
            except UserError:
                continue
            return optuna.Trial(study, t._trial_id), True
    if len(study.get_trials(deepcopy=False)) >= trials:
        return None
    trial = study.ask()
    if trial.number >= trials:  # another worker asked for the last one at the same moment
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    run = os.path.join(folder, f"trial-{trial.number}")
    os.makedirs(run, exist_ok=True)
    rundir.lock(run)
    return trial, False


def run_trial(study, trial, resumed, rest, space, folder):
    """Trial `trial` as a vitfood run in its folder; its end told to the study."""
    from optuna.trial import TrialState
    from vitfood.train import main as train
    values = trial.params if resumed else {s.name: s.suggest(trial) for s in space}
    run = os.path.join(folder, f"trial-{trial.number}")
    trial.set_user_attr("command", shlex.join(["python", "-m", "vitfood.train", *rest, *flags(values)]))
    print(f"trial {trial.number}{' (resumed)' if resumed else ''}: {' '.join(flags(values))}", flush=True)
    pruned = []

    def on_eval(step, score):
        trial.report(score, step)
        if trial.should_prune():
            pruned.append(step)
            return PRUNED
        return None

    try:
        results = train([*rest, *flags(values), "--output-dir", run, "--resume", "auto"], on_eval=on_eval)
    except SystemExit as e:
        if pruned and e.code == 75:
            print(f"trial {trial.number}: pruned at step {pruned[0]}", flush=True)
            study.tell(trial, state=TrialState.PRUNED)
            return
        raise  # a stop signal: the trial stays running, and the same command resumes it
    except UserError as e:
        trial.set_user_attr("error", str(e))
        print(f"trial {trial.number} failed: {e}", flush=True)
        study.tell(trial, state=TrialState.FAIL)
        return
    if results is None:  # it had finished before a kill took the tuner: its results are in its folder
        with open(os.path.join(run, "all_results.json")) as fh:
            results = json.load(fh)
    row = metrics.scored(metrics.table(results))  # top-1, or mAP
    study.tell(trial, results[row.result])
    print(f"trial {trial.number}: {row.heading} {results[row.result]:.4f}", flush=True)


def summary(study, trials, folder):
    """The study's account, printed and in STUDY_DIR/summary.json, once every trial has ended."""
    import optuna
    from optuna.trial import TrialState
    mine = [t for t in study.get_trials() if t.number < trials]
    done = [t for t in mine if t.state == TrialState.COMPLETE]
    if not done:
        print(f"study {study.study_name}: no trial finished ({len(mine)} of {trials} ended)")
        return None
    best = max(done, key=lambda t: t.value)
    try:
        importance = optuna.importance.get_param_importances(study, target=lambda t: t.value) if len(done) > 1 else {}
    except Exception as e:  # a single value of an option, too few trials: said, not fatal
        importance = {"unavailable": first_line(e)}
    doc = dict(best=dict(trial=best.number, score=best.value, params=best.params, command=best.user_attrs["command"],
                         model=os.path.join(folder, f"trial-{best.number}", "model")),
               ranking=[dict(trial=t.number, score=t.value, params=t.params)
                        for t in sorted(done, key=lambda t: -t.value)],
               states={s.name.lower(): sum(t.state == s for t in mine) for s in TrialState if any(t.state == s for t in mine)},
               failed={t.number: t.user_attrs.get("error") for t in mine if t.state == TrialState.FAIL},
               importance=importance, trials=trials,
               steps_run=sum(max(t.intermediate_values, default=0) for t in mine))
    with open(os.path.join(folder, "summary.json"), "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    print(f"\nstudy {study.study_name}: {len(mine)} of {trials} trials ({', '.join(f'{n} {s}' for s, n in doc['states'].items())})")
    for row in doc["ranking"][:5]:
        print(f"  trial {row['trial']}: {row['score']:.4f}  {' '.join(flags(row['params']))}")
    if importance:
        print("  what mattered: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k}: {v}"
                                              for k, v in importance.items()))
    print(f"best: trial {best.number}, {best.value:.4f}; its model: {doc['best']['model']}\n  again: {best.user_attrs['command']}")
    return doc


def main(argv=None):
    a, rest, space = parse_args(argv)
    folder = a.study_dir or os.path.join("runs", f"tune-{safe_name(a.study)}")
    os.makedirs(folder, exist_ok=True)
    study = open_study(a, rest, space, folder)
    while (nxt := next_trial(study, a.trials, folder)) is not None:
        run_trial(study, *nxt, rest, space, folder)
        gc.collect()  # the trial's loader workers end with it, not at some later collection
    return summary(study, a.trials, folder)


def cli():
    run_main(main)


if __name__ == "__main__":
    cli()
