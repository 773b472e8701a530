"""Every lesson is safe to Run All: no code cell of nbs/ writes into the checkout. A student's Run All in Jupyter runs
every cell, the `slow` ones included, so each cell that writes must write into a temporary folder (or sit behind an
off-by-default parameter that hands it one).

A static check of the notebooks' source, by the patterns a write takes here: the kit's writers (`run_ablation`,
`reproduce`, `build_table`, `update_readme`, `train`, the callbacks that keep files, ...), file writes (`open(.., 'w')`,
`write_text`, `mkdir`, `savefig`, `torch.save`, `shutil.copy`, ...) and the commands (`main([...])`, `cifar-kit ...`).
The folder each one writes to must come from a temporary folder: a name bound (directly or through other names) to
`tempfile.mkdtemp()`, `tempfile.gettempdir()`, `TemporaryDirectory()`, an in-memory buffer, or, inside a helper a cell
defines, the helper's parameter (its caller decides). A relative path, `repro_root()` or a missing folder argument (the
kit's defaults are the checkout's `runs/` and `reproductions/`) is a finding.

Not findings: a call a cell expects to be refused before it writes (inside `test_fail(...)`, or a command whose exit
status the cell checks is 2); the function bodies of `#| export` cells (the package's code, checked by its own tests);
and nbdev's `nbdev_export()` in each notebook's last cell, which regenerates the package from the notebooks (the same
files when they agree, as `make test` checks)."""
import ast, json, re, shlex
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'

TEMP_SOURCES = {'mkdtemp', 'gettempdir', 'TemporaryDirectory', 'NamedTemporaryFile', 'mkstemp', 'BytesIO', 'StringIO'}
CONFIG_BUILDERS = {'config_from', 'recipe_config', 'TrainConfig'}   # a config is temporary when its run_dir is
# the kit's writers: name -> (the argument naming where it writes, its position, whether leaving it out writes anyway)
WRITERS = {
    'run_ablation': ('root', 0, True), 'write_ablation_summary': ('path', 1, True),
    'reproduce': ('runs_dir', 4, True), 'run_one': ('runs_dir', 2, True), 'reproduce_cmd': ('runs_dir', 4, True),
    'build_table': ('out_dir', 1, True), 'table_cmd': ('out_dir', 1, True), 'update_readme': ('path', 0, True),
    'demo_cmd': ('out_dir', 0, True), 'export_cmd': ('out_dir', 1, True),
    'write_eval_record': ('out_dir', 1, True), 'eval_cmd': ('out_dir', None, False),
    'evaluate_checkpoint': ('out_dir', None, False),
    'sample_grid': ('path', 6, False), 'augment_grid': ('path', 5, False), 'plot_results': ('path', 1, False),
    'smoke_data': ('root', 2, False), 'execute_notebook': ('output_path', 1, True),
    **(CALLBACKS := {'CheckpointCB': ('run_dir', 0, True), 'HistoryCSVCB': ('path', 0, True),
                     'CurvesCB': ('path', 0, True), 'TensorBoardCB': ('log_dir', 0, True),
                     'BlockStatsCB': ('path', 0, True)}),   # they write when fit
    'write_fake_cifar': ('root', 0, True), 'write_fake_imagefolder': ('root', 0, True),
    'write_fake_svhn': ('root', 0, True), 'write_fake_cifar10_1': ('root', 0, True),
    'write_fake_cifar_c': ('root', 0, True),
    'atomic_write': ('path', 0, True), 'atomic_save': ('path', 1, True), 'atomic_write_json': ('path', 1, True),
    'save_keeping_previous': ('path', 1, True), 'write_record': ('run_dir', 1, True),
    'write_run_config': ('run_dir', 1, True), 'add_to_record': ('run_dir', 0, True),
    'write_history': ('path', 1, True),
}
BARE_WRITERS = {'export': ('out_dir', 1, True)}   # names too common to match as a method (`hub.export` is bare)
TRAINERS = {'train', '_train', 'distill', 'train_cmd', 'distill_cmd'}   # run_dir=, or a config that has one
MODULE_WRITERS = {'torch.save': 1, 'np.save': 0, 'numpy.save': 0, 'shutil.copy': 1, 'shutil.copy2': 1,
                  'shutil.copyfile': 1, 'shutil.copytree': 1, 'shutil.move': 1, 'shutil.rmtree': 0, 'os.remove': 0,
                  'os.unlink': 0, 'os.makedirs': 0, 'os.mkdir': 0, 'os.rename': 1, 'os.replace': 1}
PATH_METHODS = {'write_text', 'write_bytes', 'mkdir', 'touch', 'unlink', 'rmdir', 'symlink_to', 'hardlink_to'}
ARG_METHODS = {'savefig', 'to_csv', 'to_json', 'to_parquet'}   # obj.savefig(path)
# the commands that write, and the flags that say where (None: the positional after the command's first)
COMMAND_OUT = {'train': ('--run-dir', '--out-dir', '--output'), 'distill': ('--run-dir', '--out-dir', '--output'),
               'demo': ('--out-dir',), 'reproduce': ('--runs-dir',), 'table': ('--out-dir',),
               'export': ('--out-dir', None), 'eval': ('--out-dir',)}
OPTIONAL_OUT = {'eval'}   # writes only when given a folder


def dotted(node)->str:
    "'a.b.c' for a Name or an Attribute chain, else ''"
    parts = []
    while isinstance(node, ast.Attribute): parts.append(node.attr); node = node.value
    return '.'.join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ''


def _is_export(src:str)->bool:
    return any(re.match(r'#\|\s*export', l) for l in src.splitlines() if l.startswith('#|'))


class Scan:
    "Walk one notebook's cells in order, tracking which names hold temporary folders; collect the writes elsewhere"
    def __init__(self): self.safe, self.wrappers, self.found = set(), set(), []

    # -- which expressions name a temporary folder
    def temp(self, node, safe)->bool:
        if node is None or isinstance(node, ast.Constant): return False
        if isinstance(node, ast.Name): return node.id in safe
        if isinstance(node, ast.Call):
            name = dotted(node.func).split('.')[-1]
            kw = {k.arg: k.value for k in node.keywords}
            if name in TEMP_SOURCES: return True
            if name in CONFIG_BUILDERS: return self.temp(kw.get('run_dir'), safe)
            if name == 'replace' and node.args:   # dataclasses.replace(config, ...)
                return self.temp(kw['run_dir'] if 'run_dir' in kw else node.args[0], safe)
        return any(self.temp(c, safe) for c in ast.iter_child_nodes(node))

    def bind(self, target, value_temp:bool, safe):
        for n in ast.walk(target):
            if isinstance(n, ast.Name): (safe.add if value_temp else safe.discard)(n.id)

    # -- the writes
    def flag(self, node, what:str):
        self.found.append(f"cell {self.cell}, line {node.lineno}: {what}: `{ast.unparse(node)[:100]}`")

    def out_arg(self, call, kw_name, pos):
        kw = {k.arg: k.value for k in call.keywords}
        if kw_name in kw: return kw[kw_name]
        if pos is not None and pos < len(call.args) and not isinstance(call.args[pos], ast.Starred):
            return call.args[pos]
        return None

    def check_writer(self, call, name, spec, safe):
        kw_name, pos, required = spec
        out = self.out_arg(call, kw_name, pos)
        if out is None:
            if required and not any(k.arg is None for k in call.keywords):
                self.flag(call, f"{name} without `{kw_name}` writes into the checkout's default folder")
        elif not (isinstance(out, ast.Constant) and out.value is None) and not self.temp(out, safe):
            self.flag(call, f"{name} writes to `{ast.unparse(out)}`, not a temporary folder")

    def check_trainer(self, call, name, safe):
        kw = {k.arg: k.value for k in call.keywords}
        if 'run_dir' in kw: ok = self.temp(kw['run_dir'], safe)
        elif name in ('train', '_train'): ok = any(self.temp(a, safe) for a in call.args[:2])   # a config, a folder
        else: ok = False
        if not ok: self.flag(call, f"{name} trains into a run folder that is not a temporary one (give run_dir)")

    def check_argv(self, node, argv, safe):
        "A command line given as expressions: the command, then its arguments"
        words = [a.value if isinstance(a, ast.Constant) else None for a in argv]
        if not words or words[0] not in COMMAND_OUT or {'--help', '-h'} & set(words): return
        cmd, flags = words[0], COMMAND_OUT[words[0]]
        if cmd == 'table' and '--readme' in words: return self.flag(node, 'cifar-kit table --readme rewrites README.md')
        outs = [argv[i + 1] for i, w in enumerate(words[:-1]) if w in flags]
        outs += [ast.Constant(w.split('=', 1)[1]) for w in words if w and w.split('=')[0] in flags and '=' in w]
        if None in flags:
            pos = [a for a, w in zip(argv[1:], words[1:]) if not (w or '').startswith('-')]
            outs += pos[1:2]
        if not outs and cmd not in OPTIONAL_OUT:
            self.flag(node, f"cifar-kit {cmd} without {flags[0]} writes into the checkout's default folder")
        for o in outs:
            if not self.temp(o, safe): self.flag(node, f"cifar-kit {cmd} writes to `{ast.unparse(o)}`")

    def argv_of(self, call, safe):
        "The command line of `main([...])`, a wrapper of it, or `subprocess.run([..., 'cifar_kit', ...])`"
        name = dotted(call.func)
        if name.split('.')[-1] == 'main' or name in self.wrappers:
            if name in self.wrappers: return list(call.args)
            a = call.args[0] if call.args else None
            return list(a.elts) if isinstance(a, (ast.List, ast.Tuple)) else None
        if name.startswith('subprocess.') and call.args and isinstance(call.args[0], (ast.List, ast.Tuple)):
            elts = call.args[0].elts
            words = [e.value if isinstance(e, ast.Constant) else None for e in elts]
            for i, w in enumerate(words):
                if w in ('cifar_kit', 'cifar-kit') or (isinstance(w, str) and w.endswith('/cifar-kit')):
                    return elts[i + 1:]
        return None

    def check_call(self, call, safe):
        name = dotted(call.func); last = name.split('.')[-1]
        if name == '__magic__': return self.shell(self.magic[call.args[0].value], call.lineno, safe)
        bare = isinstance(call.func, ast.Name)
        if last in WRITERS: self.check_writer(call, last, WRITERS[last], safe)
        elif bare and last in BARE_WRITERS: self.check_writer(call, last, BARE_WRITERS[last], safe)
        elif (bare or name.startswith('cifar_kit.')) and last in TRAINERS: self.check_trainer(call, last, safe)
        if last == 'table_cmd' and any(k.arg == 'readme' for k in call.keywords):
            self.flag(call, 'table_cmd(readme=True) rewrites README.md')
        if name in MODULE_WRITERS:
            out = self.out_arg(call, None, MODULE_WRITERS[name])
            if out is not None and not self.temp(out, safe):
                self.flag(call, f"{name} writes outside a temporary folder")
        if isinstance(call.func, ast.Attribute) and dotted(call.func.value) not in ('os', 'shutil', 'torch', 'np'):
            if call.func.attr in PATH_METHODS and not self.temp(call.func.value, safe):
                self.flag(call, f".{call.func.attr}() on a path that is not in a temporary folder")
            if call.func.attr in ARG_METHODS and call.args and not self.temp(call.args[0], safe):
                self.flag(call, f".{call.func.attr}() to a path that is not in a temporary folder")
        if last == 'open':   # open(), gzip.open(), ...
            mode = self.out_arg(call, 'mode', 1)
            if isinstance(mode, ast.Constant) and set(str(mode.value)) & set('wax+') and call.args \
               and not self.temp(call.args[0], safe):
                self.flag(call, 'open() for writing outside a temporary folder')
        argv = self.argv_of(call, safe)
        if argv is not None: self.check_argv(call, argv, safe)

    # -- walking the code
    def refused(self, node)->bool:
        "A call the cell expects to fail before writing: `test_fail(...)`, or `test_eq(main([...]), 2)`"
        if not isinstance(node, ast.Call): return False
        name = dotted(node.func).split('.')[-1]
        if name == 'test_fail': return True
        return (name == 'test_eq' and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == 2 and isinstance(node.args[0], ast.Call))

    def expr(self, node, safe):
        if node is None or self.refused(node): return
        if isinstance(node, ast.Lambda):
            inner = set(safe) | {a.arg for a in ast.walk(node.args) if isinstance(a, ast.arg)}
            return self.expr(node.body, inner)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = set(safe)
            for g in node.generators:
                self.expr(g.iter, inner); self.bind(g.target, self.temp(g.iter, inner), inner)
                for c in g.ifs: self.expr(c, inner)
            for part in ((node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)):
                self.expr(part, inner)
            return
        if isinstance(node, ast.NamedExpr): self.bind(node.target, self.temp(node.value, safe), safe)
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call) and
                dotted(node.value.func).split('.')[-1] in CALLBACKS):   # `CurvesCB('c.png').path`: looked at, never fit
            for c in ast.iter_child_nodes(node.value): self.expr(c, safe)
            return
        if isinstance(node, ast.Call): self.check_call(node, safe)
        for c in ast.iter_child_nodes(node): self.expr(c, safe)

    def checked_code(self, stmts, i)->bool:
        "Whether statement `i` assigns a command's exit status that the next statement checks is 2 (a refusal)"
        s = stmts[i]
        if not (isinstance(s, ast.Assign) and isinstance(s.value, ast.Call) and self.argv_of(s.value, set())):
            return False
        t = s.targets[0]
        code = (t.elts[0] if isinstance(t, ast.Tuple) else t)
        nxt = stmts[i + 1] if i + 1 < len(stmts) else None
        return (isinstance(code, ast.Name) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Call)
                and dotted(nxt.value.func) == 'test_eq' and ast.unparse(nxt.value.args[0]) == code.id
                and ast.unparse(nxt.value.args[1]) == '2')

    def block(self, stmts, safe, export=False):
        for i, s in enumerate(stmts):
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in s.decorator_list: self.expr(d, safe)
                if export: continue
                self.function(s, safe)
            elif isinstance(s, ast.ClassDef):
                if not export: self.block(s.body, set(safe))
            elif self.checked_code(stmts, i): continue
            elif isinstance(s, (ast.Assign, ast.AnnAssign)):
                self.expr(s.value, safe)
                for t in (s.targets if isinstance(s, ast.Assign) else [s.target]):
                    if isinstance(t, ast.Tuple) and isinstance(s.value, ast.Tuple) and len(t.elts) == len(s.value.elts):
                        for te, ve in zip(t.elts, s.value.elts): self.bind(te, self.temp(ve, safe), safe)
                    elif s.value is not None: self.bind(t, self.temp(s.value, safe), safe)
            elif isinstance(s, (ast.For, ast.AsyncFor)):
                self.expr(s.iter, safe); self.bind(s.target, self.temp(s.iter, safe), safe)
                self.block(s.body, safe, export); self.block(s.orelse, safe, export)
            elif isinstance(s, (ast.With, ast.AsyncWith)):
                if any(self.refused(it.context_expr) or dotted(getattr(it.context_expr, 'func', None)).split('.')[-1]
                       in ('ExceptionExpected', 'raises') for it in s.items): continue
                for it in s.items:
                    self.expr(it.context_expr, safe)
                    if it.optional_vars is not None: self.bind(it.optional_vars, self.temp(it.context_expr, safe), safe)
                self.block(s.body, safe, export)
            elif isinstance(s, (ast.If, ast.While)):
                self.expr(s.test, safe); self.block(s.body, safe, export); self.block(s.orelse, safe, export)
            elif isinstance(s, ast.Try):
                self.block(s.body, safe, export)
                for h in s.handlers: self.block(h.body, safe, export)
                self.block(s.orelse, safe, export); self.block(s.finalbody, safe, export)
            else:
                for c in ast.iter_child_nodes(s): self.expr(c, safe)

    def function(self, f, safe):
        "A helper a cell defines: its parameters are its caller's choice (unless their default is not temporary)"
        a = f.args
        params = [*a.posonlyargs, *a.args]
        defaults = [None] * (len(params) - len(a.defaults)) + list(a.defaults)
        pairs = list(zip(params, defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
        inner = set(safe) | {p.arg for p, d in pairs if d is None or (isinstance(d, ast.Constant) and d.value is None)
                             or self.temp(d, safe)}
        inner |= {v.arg for v in (a.vararg, a.kwarg) if v is not None}
        for d in [*a.defaults, *(d for d in a.kw_defaults if d is not None)]: self.expr(d, safe)
        if a.vararg is not None and any(isinstance(c, ast.Call) and dotted(c.func).split('.')[-1] == 'main' and
                                        a.vararg.arg in {n.id for n in ast.walk(c) if isinstance(n, ast.Name)}
                                        for c in ast.walk(f)):
            self.wrappers.add(f.name)   # def run(*argv): ... main(list(argv)): its calls are command lines
            return
        self.block(f.body, inner)

    def shell(self, line:str, lineno:int, safe):
        "A `!` line: `cifar-kit COMMAND ...` must name a temporary folder, and `>` write to /tmp or /dev/null"
        line = line.strip()
        if line.startswith(('%%writefile', '%writefile', '%save')):
            return self.found.append(f"cell {self.cell}, line {lineno}: a magic that writes a file: `{line}`")
        if not line.startswith('!'): return
        try: words = shlex.split(line[1:])
        except ValueError: return
        for i, w in enumerate(words):
            if w.endswith('cifar-kit') or (w == 'cifar_kit' and i and words[i - 1] == '-m'):
                argv = [ast.Constant(x) if not re.fullmatch(r'[{$]\w+[}]?', x) else ast.Name(x.strip('{}$'))
                        for x in words[i + 1:]]
                node = ast.Expr(ast.Constant(line)); node.lineno = lineno
                self.check_argv(node, argv, safe)
            to = w.lstrip('>') or (words[i + 1] if i + 1 < len(words) else '')
            if w.startswith('>') and not to.startswith(('/tmp/', '/dev/null')):
                self.found.append(f"cell {self.cell}, line {lineno}: a shell write: `{line}`")

    def run(self, nb:dict)->list[str]:
        for self.cell, c in enumerate(nb['cells']):
            if c['cell_type'] != 'code': continue
            lines = ''.join(c['source']).splitlines()
            if lines and lines[0].startswith('%%'):   # a cell magic: the cell is not Python
                if lines[0].startswith(('%%bash', '%%sh', '%%script')): lines = ['!' + l for l in lines[1:]]
                for n, l in enumerate(lines, 1): self.shell(l, n, self.safe)
                continue
            # IPython's `!` and `%` lines: a call that `check_call` hands to `shell`, in their place in the cell
            self.magic = [l if l.lstrip().startswith(('!', '%')) else None for l in lines]
            code = '\n'.join(re.sub(r'^(\s*)[!%].*$', rf'\1__magic__({i})', l) for i, l in enumerate(lines))
            self.block(ast.parse(code).body, self.safe, _is_export('\n'.join(lines)))
        return self.found


def problems(nb:dict)->list[str]: return Scan().run(nb)

def notebook(*cells:str)->dict: return {'cells': [{'cell_type': 'code', 'source': s} for s in cells]}

def lessons(): return sorted(p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)


@pytest.mark.parametrize('path', lessons(), ids=lambda p: p.relative_to(NBS).as_posix())
def test_no_cell_writes_into_the_checkout(path):
    found = problems(json.loads(path.read_text()))
    assert not found, f"{path.relative_to(ROOT)} writes into the checkout on Run All:\n" + '\n'.join(found)


# the ablation cell of nbs/27_modern.ipynb before it was put behind a parameter: a Run All trained 42 runs into the
# checkout's runs/ and wrote the summary among the committed results
OLD_ABLATION_CELL = """#| slow
recs = run_ablation('../runs/ablation')
write_ablation_summary(recs, f"../benchmarks/results/ablation/digits-cpu-{time.strftime('%Y-%m-%d')}.json");"""


def test_the_old_ablation_cell_is_found():
    found = problems(notebook('import time, tempfile', OLD_ABLATION_CELL))
    assert len(found) == 2 and 'run_ablation writes to' in found[0] and 'write_ablation_summary' in found[1], found


@pytest.mark.parametrize('code', [
    "run_ablation()", "reproduce(['alexnet-c10'], smoke=True)", "build_table(fake)", "update_readme()",
    "train(recipe='resnet20-digits', epochs=1)", "train(config_from('resnet20-digits'))",
    "c = config_from('resnet20-digits', run_dir='runs/x')\ntrain(c)", "distill('resnet20', ck, 'resnet20')",
    "demo_cmd()", "main(['demo'])", "main(['train', '--recipe', 'resnet20-digits'])",
    "main(['table', '--readme'])", "main(['reproduce', 'alexnet-c10', '--smoke'])", "table_cmd(readme=True)",
    "Path('../README.md').write_text('x')", "open('../runs/x.json', 'w')", "fig.savefig('curves.png')",
    "torch.save(sd, '../runs/x.pt')", "root = Path('../runs')\n(root/'x').mkdir()",
    "out = repro_root()\nbuild_table(None, out)", "def go(root='../runs'): run_ablation(root)\ngo()",
    "d = tempfile.mkdtemp()\nd = '../runs'\nrun_ablation(d)", "!cifar-kit demo", "!cifar-kit train --out-dir runs/x",
    "%%writefile ../cifar_kit/x.py\nx = 1", "!echo hi > ../README.md", "%%bash\ncifar-kit demo",
    "subprocess.run([sys.executable, '-m', 'cifar_kit', 'demo'])", "with open('notes.txt', 'a') as f: f.write('x')",
])
def test_a_write_into_the_checkout_is_found(code):
    assert problems(notebook(code)), code


@pytest.mark.parametrize('code', [
    "tmp = Path(tempfile.mkdtemp())\nrun_ablation(tmp/'a')\nwrite_ablation_summary([], tmp/'s.json')",
    "tmp = Path(tempfile.mkdtemp())\nc = config_from('resnet20-digits', run_dir=str(tmp/'r'))\ntrain(c)\n"
    "train(dataclasses.replace(c, epochs=2))",
    "with tempfile.TemporaryDirectory() as d: main(['demo', '--out-dir', d])",
    "test_fail(lambda: reproduce(['x'], seeds=[-1]), contains='seeds')", "test_eq(main(['reproduce', 'nope']), 2)",
    "def run(*argv): return main(list(argv))\ncode, out = run('table', '--readme')\ntest_eq(code, 2)",
    "buf = io.BytesIO(); fig.savefig(buf)", "df = results_table()\nPath('../benchmarks/results/a').glob('*.json')",
    "#| export\ndef run_ablation(root='runs/ablation'):\n    train(config_from('x', run_dir=root))",
    "import nbdev; nbdev.nbdev_export()", "main(['models', 'resnet*'])", "main(['train', '--help'])",
    "run_the_ablation = False\nif run_the_ablation: run_ablation(Path(tempfile.gettempdir())/'cifar_kit_ablation')",
    "tmp = tempfile.mkdtemp()\n!cifar-kit demo --out-dir {tmp}",
    "%matplotlib inline\n!ls ../runs > /dev/null", "%%bash\ncifar-kit models",
])
def test_a_write_into_a_temporary_folder_is_not(code):
    assert not problems(notebook(code)), problems(notebook(code))
