"""Build the course site from the notebooks: `make site` (the tests' size) or `make docs` (the lessons' full size).

    python docs/build.py --size ci|full [--jobs 2] [--allow-missing] [--only nbs/04_resnet.ipynb ...]

The steps, in order:

1. `docs/course.yml` must name every notebook under `nbs/` exactly once (`course_problems`).
2. Every formula (`$...$`, `$$...$$`) of every markdown cell must convert to MathML (`markdown_math`), checked before
   anything runs, so that a bad formula fails the build in seconds.
3. The notebooks run with nbclient, `--jobs` at a time, each in its own folder with `CIFAR_KIT_LESSON` set to the size
   (`run_notebook`), in a Jupyter kernel that each worker keeps for its next notebook, as nbdev-test's workers keep their
   process (`--fresh-kernels`: one per notebook). The cells that run are the ones `nbdev-test` runs (`cells_to_run`); a
   failing cell fails the build, naming the notebook and the cell, so the CI build is also the notebook test.
4. Each executed notebook becomes a Markdown page (`notebook_page`) with its images as files beside it; the landing page
   gets the course map (`course_map_table`), built from the lessons' `lesson_result` outputs and their run times.
5. One API page per public module of `cifar_kit` (`api_modules`), rendered by mkdocstrings from the source, statically.
6. mkdocs (Material theme, no web fonts) writes `_site/`; `offline_problems` then checks that no page loads anything
   from the internet.
7. At the full size, the results go to `docs/results/course.json` (`write_course_json`), the record the README's
   course map is rendered from (`course_map_table(json.load(...))`); a full build of some notebooks (`--only`) rewrites
   only their lessons' rows and says so in the record (`update_course_json`). The CI size writes nothing git tracks.

Everything else it writes lies in `_build/` (pages, executed notebooks, mkdocs.yml, timings) and `_site/`, both ignored.
"""
from __future__ import annotations
import argparse, atexit, base64, hashlib, concurrent.futures, datetime, functools, html, json, multiprocessing, os, platform, re, shutil, subprocess
import sys, time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
NBS = REPO/'nbs'
COURSE_YML = REPO/'docs'/'course.yml'
COURSE_JSON = REPO/'docs'/'results'/'course.json'
BUILD = REPO/'_build'          # pages, executed notebooks, mkdocs.yml: everything between the notebooks and the site
SITE = REPO/'_site'
PAGES = BUILD/'pages'
EXECUTED = BUILD/'executed'
PACKAGE = 'cifar_kit'
RESULT_MIME = 'application/vnd.cifar-kit.result+json'   # as cifar_kit.core.RESULT_MIME (not imported: that pulls in torch)
SIZES = ('full', 'ci')


class BuildError(Exception):
    "A problem the build reports and stops on (the message names the notebook, and the cell or formula)"


def log(msg:str): print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The course: docs/course.yml
# ---------------------------------------------------------------------------------------------------------------------

def load_course(path:Path=COURSE_YML)->dict:
    "docs/course.yml as a dict: `home` (a notebook), `lessons` and `reference` (lists of parts)"
    return yaml.safe_load(Path(path).read_text())


def course_entries(course:dict)->list[dict]:
    """Every notebook `course` names, in the site's order: the home page, the lessons, the reference.
    Each entry: `nb` (path under nbs/), `section` ('Course' or 'Reference'), `part` (None for home), `claim` (lessons)"""
    out = [dict(nb=course['home'], section='Course', part=None, claim=None)]
    for part in course.get('lessons') or []:
        for item in part['notebooks']:
            out.append(dict(nb=item['nb'], section='Course', part=part['part'], claim=item.get('claim')))
    for part in course.get('reference') or []:
        for nb in part['notebooks']:
            out.append(dict(nb=nb, section='Reference', part=part['part'], claim=None))
    return out


def notebooks_on_disk(nbs:Path=NBS)->list[str]:
    "The notebooks under `nbs`, as paths relative to it, leaving out what nbdev leaves out (names starting with '_' or '.')"
    return sorted(p.relative_to(nbs).as_posix() for p in nbs.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(nbs).parts))


def course_problems(course:dict|None=None, nbs:Path=NBS)->dict[str, list[str]]:
    """How `course` (default: docs/course.yml) fails to name every notebook under `nbs` exactly once:
    `unlisted` (on disk, not in the file), `duplicates` (named twice or more), `missing` (named, but no such file)"""
    course = load_course() if course is None else course
    named = [e['nb'] for e in course_entries(course)]
    disk = set(notebooks_on_disk(nbs))
    return dict(unlisted=sorted(disk - set(named)),
                duplicates=sorted({n for n in named if named.count(n) > 1}),
                missing=[n for n in dict.fromkeys(named) if n not in disk])


def check_course(course:dict, allow_missing:bool=False)->list[str]:
    "Fail unless `course` names every notebook once; return the named notebooks that do not exist (only with `allow_missing`)"
    p = course_problems(course)
    msgs = []
    if p['unlisted']: msgs.append(f"notebooks missing from {COURSE_YML.name} (add each to a part): {', '.join(p['unlisted'])}")
    if p['duplicates']: msgs.append(f"notebooks named more than once in {COURSE_YML.name}: {', '.join(p['duplicates'])}")
    if p['missing'] and not allow_missing:
        msgs.append(f"{COURSE_YML.name} names notebooks that do not exist under nbs/: {', '.join(p['missing'])} "
                    "(write them, fix the names, or build with --allow-missing to skip them)")
    if msgs: raise BuildError('\n'.join(msgs))
    for nb in p['missing']: log(f"warning: {nb} is named in {COURSE_YML.name} but does not exist yet: skipped (--allow-missing)")
    return p['missing']


def page_path(nb:str)->str:
    "The Markdown page of notebook `nb` (relative to nbs/) inside the site's pages: 'data/04_augment.md', 'index.md'"
    return str(Path(nb).with_suffix('.md').as_posix())


# ---------------------------------------------------------------------------------------------------------------------
# 2. Math: $...$ and $$...$$ to MathML, at build time
# ---------------------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r'^( {0,3})(`{3,}|~{3,})')
_CODE_SPAN = re.compile(r'(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)', re.S)
# $$...$$ anywhere; $...$ as pandoc reads it: no space after the opening $, none before the closing one, no digit after it
_MATH = re.compile(r'(?<![\\$])\$\$(?P<display>.+?)(?<!\\)\$\$'
                   r'|(?<![\\$])\$(?![\s$])(?P<inline>(?:[^$\\]|\\.)+?)(?<![\s\\])\$(?!\d)', re.S)
_TEXT_NODE = re.compile(r'>([^<]+)<')


class MathError(ValueError):
    "A formula latex2mathml cannot convert"


def tex_to_mathml(tex:str, display:bool=False)->str:
    """MathML for the LaTeX `tex`, on one line and safe inside Markdown (every non-alphanumeric character of the text
    escaped as a character reference); `MathError` if latex2mathml fails or leaves a command it does not know"""
    from latex2mathml.converter import convert
    try: out = convert(tex.strip(), display='block' if display else 'inline')
    except Exception as e: raise MathError(f"latex2mathml cannot convert it ({type(e).__name__}: {e})".rstrip(': )') + ')') from None
    texts = [html.unescape(t) for t in _TEXT_NODE.findall(out)]
    if unknown := [t for t in texts if '\\' in t]:
        raise MathError(f"latex2mathml does not know {', '.join(sorted(set(unknown)))}")
    def esc(m): return '>' + ''.join(c if c.isalnum() and c.isascii() else f'&#{ord(c)};' for c in html.unescape(m[1])) + '<'
    out = _TEXT_NODE.sub(esc, out.replace(' xmlns="http://www.w3.org/1998/Math/MathML"', '')).replace('\n', ' ')
    # Markdown takes a <math> at the start of a line for a block of raw HTML, which would cut an inline formula's
    # paragraph in two: an inline formula goes inside a <span>
    return out if display else f'<span class="math">{out}</span>'


def _math_in_text(text:str, errors:list)->str:
    "Formulas of `text` (no code in it) to MathML; `\\$` to `$`"
    def conv(m):
        tex, display = (m['display'], True) if m['display'] is not None else (m['inline'], False)
        if not display and '\n\n' in tex: return m[0]     # a $ that opens no formula in this paragraph
        try: return tex_to_mathml(tex, display)
        except MathError as e: errors.append(f"{'$$' if display else '$'}{tex}{'$$' if display else '$'}: {e}"); return m[0]
    return _MATH.sub(conv, text).replace('\\$', '$')


def markdown_math(md:str)->tuple[str, list[str]]:
    "`md` with its formulas as MathML, leaving fenced code and code spans alone; and the formulas that failed"
    errors, out, prose, fence = [], [], [], None
    def flush():
        if not prose: return
        text, pieces, last = ''.join(prose), [], 0
        for m in _CODE_SPAN.finditer(text):
            pieces += [_math_in_text(text[last:m.start()], errors), m[0]]; last = m.end()
        out.append(''.join(pieces) + _math_in_text(text[last:], errors)); prose.clear()
    for line in md.splitlines(True):
        m = _FENCE.match(line)
        if fence is None and m: flush(); fence = m[2]; out.append(line)
        elif fence is not None:
            out.append(line)
            if m and m[2][0] == fence[0] and len(m[2]) >= len(fence) and not line.strip()[len(m[2]):]: fence = None
        else: prose.append(line)
    flush()
    return ''.join(out), errors


# ---------------------------------------------------------------------------------------------------------------------
# 3. Running a notebook: the cells nbdev-test runs, with nbclient, in the notebook's folder
# ---------------------------------------------------------------------------------------------------------------------

def skip_flags()->list[str]:
    "The flags whose cells the tests skip: `tst_flags` of [tool.nbdev] in pyproject.toml ('notest slow gpu')"
    from nbdev.config import get_config   # nbdev reads pyproject.toml's [tool.nbdev] (on Python 3.10 too)
    return str(get_config(path=REPO).get('tst_flags', '')).split()


def read_cells(path:Path):
    "The notebook at `path` read by nbdev, each cell with its directives (`cell.directives_`, notebook-level ones included)"
    from nbdev.process import NBProcessor
    return NBProcessor(path, rm_directives=False).nb


def cells_to_run(nb, flags:list[str])->list[bool]:
    """For each cell of `nb` (read by `read_cells`), whether it runs: exactly what `nbdev-test` runs, so that a build
    fails where the notebook test fails. Not run: a notebook with `skip_exec` in its front matter; markdown and raw cells;
    cells with `#| eval: false` (or a notebook-level `eval: false` they do not override); cells that call `nbdev_export(`;
    cells tagged `skip-execution`; cells with one of `flags` (`#| slow`, `#| notest`, `#| gpu`)"""
    from nbdev.frontmatter import nb_frontmatter
    from fastcore.nbio import fm_default_eval, does_cell_eval
    fm = nb_frontmatter(nb)
    if str(fm.get('skip_exec', False)).lower() in ('true', '1', 'yes'): return [False]*len(nb.cells)
    dflt = fm_default_eval(fm)
    return [c.cell_type == 'code' and does_cell_eval(c, dflt) and not (set(flags) & set(c.directives_)) for c in nb.cells]


def kernel_env(size:str)->dict:
    "The kernel's environment: ours, with the lesson size, passive OpenMP waits, and this checkout first on the path"
    env = dict(os.environ, CIFAR_KIT_LESSON=size)
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    return env


_ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def _cell_failure(nb_name:str, idx:int, cell, err:Exception)->str:
    "The failure's report: notebook, cell (index and id) and its first line, then nbclient's account (source and traceback)"
    first = next((l for l in cell.source.splitlines() if l.strip() and not l.startswith('#|')), '')
    lines = _ANSI.sub('', str(err)).strip().splitlines()
    return (f"{nb_name}: cell {idx} (id {cell.get('id', '?')}, `{first.strip()[:80]}`) failed: {type(err).__name__}\n"
            + '\n'.join(('  ' + l).rstrip() for l in lines[-40:]))


_KERNEL: dict = {}   # this worker process's kernel and its log: started by its first notebook, kept for the next ones

# The first cell of every notebook, taken out again afterwards: a new namespace (as nbdev-test gives each notebook a new
# shell; emptying the old one in place would break what a notebook left registered, e.g. a model factory that names a
# class of that notebook), as `__main__` too, then the notebook's folder and the lesson size
_SETUP = """import os as _os
_os.chdir({folder!r}); _os.environ['CIFAR_KIT_LESSON'] = {size!r}
_ip = get_ipython()
_ip.init_create_namespaces() or _ip.init_user_ns() or _ip.init_sys_modules()   # one statement: it runs in the old one"""


def _stop_kernel():
    km, log = _KERNEL.pop('km', None), _KERNEL.pop('log', None)
    if km is not None:
        try: km.shutdown_kernel(now=True)
        except Exception: pass
    if log is not None: log.close()


def worker_kernel(kernel_name:str, size:str):
    """This worker's kernel, started if it has none (or if it died). Its own messages go to _build/logs/kernel-<pid>.log.
    The worker's notebooks share it one after the other, as nbdev-test's workers share their process: a module is imported
    once per worker, not once per notebook, which is most of a small notebook's time"""
    km = _KERNEL.get('km')
    if km is not None and (km.kernel_name != kernel_name or not km.is_alive()): _stop_kernel(); km = None
    if km is None:
        from jupyter_client.manager import KernelManager
        (BUILD/'logs').mkdir(parents=True, exist_ok=True)
        log = open(BUILD/'logs'/f'kernel-{os.getpid()}.log', 'a')
        km = KernelManager(kernel_name=kernel_name)
        km.start_kernel(env=kernel_env(size), cwd=str(NBS), stdout=log, stderr=subprocess.STDOUT)
        _KERNEL.update(km=km, log=log)
        if not _KERNEL.get('atexit'): atexit.register(_stop_kernel); _KERNEL['atexit'] = True
    return km


def run_notebook(nb_name:str, size:str, timeout:int|None, fresh:bool=False)->dict:
    """Run notebook `nb_name` (relative to nbs/) in its folder at lesson size `size`, write its executed copy under
    _build/executed/ and its page under _build/pages/. Returns what the site needs: title, seconds, result (or error).
    It runs in this worker's kernel (`worker_kernel`) after a first cell that gives it a new namespace and moves to its
    folder (`_SETUP`); with `fresh`, in a kernel of its own, as a student opens it. After a failure the kernel is replaced"""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    path = NBS/nb_name
    run = cells_to_run(read_cells(path), skip_flags())
    nb = nbformat.read(path, as_version=4)
    assert len(run) == len(nb.cells), f"{nb_name}: nbdev and nbformat disagree on the cells"
    skip = 'cifar-kit-site-skip'      # a tag of our own on the cells not to run, for nbclient; taken off again below
    for c, r in zip(nb.cells, run):
        if c.cell_type == 'code' and not r: c.metadata.setdefault('tags', []).append(skip)
    nb.cells.insert(0, setup := nbformat.v4.new_code_cell(_SETUP.format(folder=str(path.parent), size=size)))
    current = [0]
    def started(cell, cell_index, **kw): current[0] = cell_index - 1
    kernel_name = nb.metadata.get('kernelspec', {}).get('name', 'python3')
    t0, error = time.perf_counter(), None
    try:
        if fresh: _stop_kernel()
        client = NotebookClient(nb, km=worker_kernel(kernel_name, size), timeout=timeout, allow_errors=False,
                                skip_cells_with_tag=skip, record_timing=False, on_cell_execute=started)
        try: client.execute()
        finally:
            if client.kc is not None: client.kc.stop_channels()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        error = (f"{nb_name}: the kernel could not be set up: {_ANSI.sub('', str(e))}" if current[0] < 0 else
                 _cell_failure(nb_name, current[0], nb.cells[current[0] + 1], e))
    except Exception as e:    # the kernel did not start, or died: still name the notebook
        error = f"{nb_name}: could not run: {type(e).__name__}: {e} (kernel logs: {(BUILD/'logs').relative_to(REPO)}/)"
    seconds = time.perf_counter() - t0
    if error or fresh: _stop_kernel()
    nb.cells.remove(setup)
    for c in nb.cells:        # the copy under _build/ as run, without the tags added above
        tags = c.metadata.get('tags')
        if tags and skip in tags:
            tags.remove(skip)
            if not tags: del c.metadata['tags']
    if not error:   # what `--resume` checks before it takes this copy instead of running the notebook again
        nb.metadata[STAMP] = dict(size=size, source_sha256=_sha256(path), seconds=round(seconds, 1))
    out = EXECUTED/nb_name
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out)
    if error: return dict(nb=nb_name, seconds=seconds, error=error)
    page = notebook_page(nb_name, nb, ran=run)
    return dict(nb=nb_name, seconds=seconds, size=size, **page)


# ---------------------------------------------------------------------------------------------------------------------
# 4. A notebook as a Markdown page
# ---------------------------------------------------------------------------------------------------------------------

# show_doc's link to a symbol's source on GitHub, which has no address here: '[source](/blob/main/cifar_kit/core.py#L12)'
_SOURCE_LINK = re.compile(r'\[source\]\([^)\s]*?/blob/[^/)\s]+/(?P<mod>' + PACKAGE + r'/[^#)\s]+)\.py(?:#[^)\s]*)?\)')
_LINK = re.compile(r'(\]\()(?P<target>[^)\s#]+\.ipynb)(?P<anchor>#[^)\s]*)?(?P<rest>[^)]*\))')
_PROGRESS = re.compile(r'\d+%\|.*\|\s*\d+/\d+|^HBox\(children=\(HTML\(value=.*FloatProgress', re.S)   # tqdm's bars
_HIDE_SOURCE, _HIDE_OUTPUT = ('hide', 'echo: false'), ('hide', 'output: false')


def _fence(text:str, lang:str='')->str:
    "`text` as a fenced code block, with a fence longer than any backtick run in it"
    ticks = '`' * max(3, 1 + max((len(m) for m in re.findall(r'`+', text)), default=0))
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _plain(text:str)->str:
    "Terminal text as a page shows it: no colour codes, and each line as a carriage return (tqdm) last left it"
    lines = []
    for line in _ANSI.sub('', text).split('\n'):
        lines.append(line.rstrip('\r').split('\r')[-1])
    return '\n'.join(lines)


def _links(md:str, nb_name:str)->str:
    """Links to notebooks (relative to the notebook, or to the repository: 'nbs/04_resnet.ipynb') as links to their pages;
    show_doc's source links as links to the symbol on its module's API page"""
    here = (NBS/nb_name).parent
    def source(m):
        mod = '.'.join(p for p in m['mod'].split('/') if p != '__init__')
        if mod not in api_modules(): return ''
        rel = os.path.relpath(PAGES/'api'/f'{mod}.md', (PAGES/nb_name).parent)
        name = re.search(r'^#+\s+([\w.]+)\s*$', md[m.end():], re.M)
        return f"[API]({Path(rel).as_posix()}{'#' + mod + '.' + name[1] if name else ''})"
    md = _SOURCE_LINK.sub(source, md)
    def sub(m):
        for base in (here, REPO):
            target = (base/m['target']).resolve()
            if target.is_file() and NBS in target.parents:
                rel = os.path.relpath(PAGES/page_path(target.relative_to(NBS).as_posix()), (PAGES/nb_name).parent)
                return f"{m[1]}{Path(rel).as_posix()}{m['anchor'] or ''}{m['rest']}"
        return m[0]
    return _LINK.sub(sub, md)


def _directive_on(directives:dict, names:tuple)->bool:
    for n in names:
        k, _, v = n.partition(': ')
        if k in directives and (not v or str(directives[k]).strip().lower() == v): return True
    return False


def notebook_title(nb)->str:
    "The notebook's title: its first `# ` heading (nbdev's convention), else its file name"
    for c in nb.cells:
        if c.cell_type == 'markdown':
            m = re.search(r'^#\s+(.+?)\s*$', c.source, re.M)
            if m: return m[1]
    return Path(nb.metadata.get('path_', 'notebook')).stem


def notebook_page(nb_name:str, nb, ran:list[bool]|None=None)->dict:
    """Write the page of the (executed) notebook `nb` to _build/pages/, its images into a folder beside it.
    Shown: markdown cells (formulas as MathML, links to notebooks as links to pages), each code cell's source without
    its `#|` lines (`#| export` cells too: they are the lesson's code), and its outputs: text as code blocks, images as
    files, `text/markdown` and `text/html` inline, a lesson result as a highlighted box. Hidden: `#| hide` cells (they
    run), the source of `#| echo: false` cells, the outputs of `#| output: false` cells.
    Returns its title and its lesson result (None if it shows none)"""
    from fastcore.nbio import NbCell
    page = PAGES/page_path(nb_name)
    files = page.with_name(page.stem + '_files')
    shutil.rmtree(files, ignore_errors=True)
    page.parent.mkdir(parents=True, exist_ok=True)
    parts, result, math_errors, n_img = [], None, [], 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == 'markdown':
            md, errs = markdown_math(cell.source)
            math_errors += errs
            parts.append(_links(md, nb_name))
            continue
        if cell.cell_type != 'code': continue
        nc = NbCell(i, dict(cell))
        dirs = nc.directives
        if 'include' in dirs and str(dirs['include']).lower() == 'false': continue
        if not _directive_on(dirs, _HIDE_SOURCE):
            nc.remove_directives()
            code = nc.source.strip('\n')
            if code.strip():
                note = '' if ran is None or ran[i] else '\n<p class="nb-not-run">Not run when the site is built.</p>'
                parts.append(_fence(code, 'python') + note)
        if _directive_on(dirs, _HIDE_OUTPUT): continue
        streams = []   # consecutive stream outputs of one name are one block
        for out in cell.get('outputs', []):
            if out.output_type == 'stream':
                if streams and streams[-1][0] == out.name: streams[-1][1].append(out.text)
                else: streams.append((out.name, [out.text]))
                continue
            for name, texts in streams: parts.append(_stream(name, texts))
            streams = []
            if out.output_type == 'error':
                parts.append(_output(_fence(_plain('\n'.join(out.traceback)) or f"{out.ename}: {out.evalue}", 'text'),
                                     'nb-output nb-stderr')); continue
            data = out.get('data', {})
            if RESULT_MIME in data: result = dict(data[RESULT_MIME])
            md, n_img = _rich(data, nb_name, files, i, n_img)
            if md: parts.append(md)
        for name, texts in streams: parts.append(_stream(name, texts))
    if math_errors:
        raise BuildError(f"{nb_name}: formulas latex2mathml cannot convert (fix them in the notebook):\n  " + '\n  '.join(math_errors))
    page.write_text('\n\n'.join(p for p in parts if p.strip()) + '\n')
    return dict(title=notebook_title(nb), result=result)


def _output(md:str, kind:str='nb-output')->str:
    "An output's Markdown in a <div> the site's CSS sets apart from the code"
    return f'<div class="{kind}" markdown>\n\n{md}\n\n</div>'


def _stream(name:str, texts:list[str])->str:
    text = _plain(''.join(texts)).strip('\n')
    if not text.strip(): return ''
    return _output(_fence(text, 'text'), 'nb-output' if name == 'stdout' else 'nb-output nb-stderr')


def _rich(data:dict, nb_name:str, files:Path, cell:int, n_img:int)->tuple[str, int]:
    "One display or result output as Markdown (the richest form a static page can show), and the images written so far"
    if 'application/vnd.jupyter.widget-view+json' in data:
        plain = data.get('text/plain', '')
        if _PROGRESS.search(plain): return '', n_img   # a progress bar says nothing once the run is over
        return '<p class="nb-widget">An interactive widget: run the notebook in Jupyter to use it.</p>', n_img
    if RESULT_MIME in data:
        text = re.sub(r'^\*\*Result:\*\*\s*|^Result:\s*', '', data.get('text/markdown') or data.get('text/plain', ''))
        return '!!! success "Result"\n\n' + '\n'.join('    ' + l for l in _links(text, nb_name).splitlines()), n_img
    for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/gif', 'gif'), ('image/svg+xml', 'svg')):
        if mime in data:
            files.mkdir(parents=True, exist_ok=True)
            n_img += 1
            f = files/f'cell{cell}-{n_img}.{ext}'
            raw = data[mime]
            if ext == 'svg': f.write_text(raw if isinstance(raw, str) else ''.join(raw))
            else: f.write_bytes(base64.b64decode(raw))
            alt = _plain(data.get('text/plain', 'figure')).replace('[', '(').replace(']', ')').strip()[:80] or 'figure'
            alt = alt.replace('\n', ' ')
            if alt.startswith('<'): alt = 'figure'
            return f"![{alt}]({files.name}/{f.name})", n_img
    if 'text/markdown' in data: return _links(data['text/markdown'], nb_name), n_img
    if 'text/html' in data: return f'<div class="nb-html" markdown="0">\n{data["text/html"].strip()}\n</div>', n_img
    if 'text/plain' in data: return _output(_fence(_plain(data['text/plain']), 'text')), n_img
    return '', n_img


# ---------------------------------------------------------------------------------------------------------------------
# 4b. The course map: the lessons, their claims and what the executed notebooks measured
# ---------------------------------------------------------------------------------------------------------------------

def _cell(text)->str: return str(text).replace('|', '\\|').replace('\n', ' ')


def course_map_table(course_json:dict, href=None)->str:
    """The course map as a Markdown table, from the record `docs/results/course.json` (or the same dict, built in memory):
    one row per lesson with its part, a link to it, the claim it tests, what it measured, its run time and lesson size.
    `href(nb)` gives a lesson's link (default: the notebook in the repository, 'nbs/04_resnet.ipynb', for the README)"""
    href = href or (lambda nb: f'nbs/{nb}')
    rows, part = ['| Part | Lesson | Claim | Measured | Minutes | Size |', '|---|---|---|---|--:|---|'], None
    for l in course_json['lessons']:
        title = _cell(l.get('title') or Path(l['nb']).stem)
        lesson = f"[{title}]({href(l['nb'])})" if l.get('built', True) else f"{title} (not written yet)"
        measured = _cell(l['result']) if l.get('result') else '(no result shown yet)'
        minutes = '' if l.get('seconds') is None else f"{l['seconds']/60:.1f}"
        shown, part = ('' if l['part'] == part else _cell(l['part'])), l['part']    # a part's name on its first row
        rows.append(f"| {shown} | {lesson} | {_cell(l.get('claim') or '')} | {measured} | {minutes} | {l.get('size') or ''} |")
    return '\n'.join(rows) + '\n'


def machine_info()->dict:
    "The machine the lessons ran on: CPU model, cores, torch and Python versions, date"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'): cpu = line.split(':', 1)[1].strip(); break
    except OSError: pass
    try: from importlib.metadata import version; torch = version('torch')
    except Exception: torch = None
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch, python=platform.python_version(), platform=platform.platform(),
                date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'))


def course_record(course:dict, done:dict, size:str)->dict:
    """The course map's data: `machine`, `size`, `lessons`: per lesson (in course order) `nb`, `part`, `title`, `claim`,
    `result` (text), `numbers`, `seconds` (wall time of the whole notebook), `size` (the result's size), `built`; and
    `notebooks`: the wall seconds of every notebook, lesson or reference"""
    lessons = []
    for e in course_entries(course):
        if e['section'] != 'Course' or e['part'] is None: continue
        d = done.get(e['nb'])
        r = (d or {}).get('result') or {}
        lessons.append(dict(nb=e['nb'], part=e['part'], title=(d or {}).get('title'), claim=e['claim'],
                            result=r.get('text'), numbers=r.get('numbers') or {}, seconds=None if d is None else round(d['seconds'], 1),
                            size=r.get('size') or (d or {}).get('size'), built=d is not None))
    return dict(machine=machine_info(), size=size, lessons=lessons,
                notebooks={nb: round(d['seconds'], 1) for nb, d in done.items()})


def write_course_json(record:dict, path:Path=COURSE_JSON):
    "The full build's record, tracked in git: what the README's course map is rendered from"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + '\n')


def update_course_json(partial:dict, only:list[str], path:Path=COURSE_JSON)->list[str]:
    """A full build of some notebooks (`--only`) rewrites only their lessons' rows of the record `path`, in course
    order, and notes under `partial_builds` which rows came from which machine and date; returns those lessons"""
    old = json.loads(path.read_text()) if path.exists() else dict(machine=None, size='full', lessons=[], notebooks={})
    before = {l['nb']: l for l in old.get('lessons', [])}
    rerun = [l['nb'] for l in partial['lessons'] if l['nb'] in only]
    old['lessons'] = [l if l['nb'] in rerun else before.get(l['nb'], l) for l in partial['lessons']]
    old['notebooks'] = dict(old.get('notebooks') or {}) | {nb: partial['notebooks'][nb] for nb in only if nb in partial['notebooks']}
    if rerun: old.setdefault('partial_builds', []).append(dict(machine=partial['machine'], lessons=rerun))
    write_course_json(old, path)
    return rerun


def _overlay(rec:dict, recorded:Path=COURSE_JSON, keep=lambda l: True)->dict:
    """`rec` with each lesson's result, numbers, minutes and size from the full build's record `recorded`, for the
    lessons where `keep(lesson)` holds; a lesson that record lacks keeps what `rec` has"""
    old = {l['nb']: l for l in json.loads(recorded.read_text()).get('lessons', [])} if recorded.exists() else {}
    fields = ('result', 'numbers', 'seconds', 'size')
    rec['lessons'] = [dict(l, **{k: old[l['nb']].get(k) for k in fields}) if l['nb'] in old and keep(old[l['nb']]) else l
                      for l in rec['lessons']]
    return rec


def home_record(course:dict, done:dict, size:str, recorded:Path=COURSE_JSON)->dict:
    """The course map's data for the landing page. At the full size, this build's. At the CI size, a lesson's result is
    the last full build's (docs/results/course.json), which is the one that tests its claim; a lesson that record lacks
    shows what this build measured, at the CI size (the map's Size column says which)"""
    rec = course_record(course, done, size)
    return rec if size == 'full' else _overlay(rec, recorded, keep=lambda l: bool(l.get('result')))


COURSE_MARKERS = ('<!-- course -->', '<!-- /course -->')   # where the landing page (and the README) take the course map


def home_page(course:dict, done:dict, size:str):
    """Write the course map into the landing page: between its markers `<!-- course -->` and `<!-- /course -->`, or, if it
    has none, as a section before its first `## ` heading"""
    page = PAGES/page_path(course['home'])
    text = page.read_text()
    def href(nb): return os.path.relpath(PAGES/page_path(nb), page.parent)
    table = course_map_table(home_record(course, done, size), href)
    if COURSE_MARKERS[0] not in text:
        m = re.search(r'^## ', text, re.M)
        at = m.start() if m else len(text)
        text = text[:at] + f'## The course\n\n{COURSE_MARKERS[0]}\n{COURSE_MARKERS[1]}\n\n' + text[at:]
    # Markdown needs the blank line between the marker (an HTML block) and the table
    page.write_text(_with_map(text, '\n' + table + '\n', page_path(course['home'])))


README = REPO/'README.md'
HOME_NB = NBS/'index.ipynb'


def recorded_course_map(where:str='readme', recorded:Path=COURSE_JSON)->str:
    """The course map as README.md (`where='readme'`: links to nbs/...) or the landing notebook (`'index'`: links beside
    it) carry it: the lessons, parts and claims of docs/course.yml now, each with what the last full build measured
    (docs/results/course.json); a lesson that record lacks says so"""
    import nbformat
    course = load_course()
    rec = _overlay(course_record(course, {}, 'full'), recorded)
    for l in rec['lessons']:
        l['built'] = (NBS/l['nb']).exists()
        l['title'] = notebook_title(nbformat.read(NBS/l['nb'], as_version=4)) if l['built'] else None
    return course_map_table(rec, (lambda nb: f'nbs/{nb}') if where == 'readme' else (lambda nb: nb))


def _with_map(text:str, table:str, name:str)->str:
    "`text` with the course map between its markers (one pair, else a `BuildError` naming `name`)"
    start, end = COURSE_MARKERS
    if text.count(start) != 1 or text.count(end) != 1:
        raise BuildError(f"{name} must hold one {start} ... {end} pair for the course map")
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a] + '\n' + table + text[b:]


def sync_course_maps(write:bool=True)->list[str]:
    """Bring the course maps of README.md and nbs/index.ipynb up to date with `recorded_course_map`; the files that were
    stale (with `write=False`, only report them: the test suite's check)"""
    stale = []
    text = README.read_text()
    new = _with_map(text, recorded_course_map('readme'), 'README.md')
    if new != text:
        stale.append('README.md')
        if write: README.write_text(new)
    nb = json.loads(HOME_NB.read_text())
    cells = [c for c in nb['cells'] if c['cell_type'] == 'markdown' and COURSE_MARKERS[0] in ''.join(c['source'])]
    if len(cells) != 1: raise BuildError(f"nbs/index.ipynb must hold one markdown cell with {COURSE_MARKERS[0]}")
    text = ''.join(cells[0]['source'])
    new = _with_map(text, recorded_course_map('index'), 'nbs/index.ipynb')
    if new != text:
        stale.append('nbs/index.ipynb')
        if write:
            cells[0]['source'] = new.splitlines(keepends=True)
            HOME_NB.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
    return stale


# ---------------------------------------------------------------------------------------------------------------------
# 5. The API pages
# ---------------------------------------------------------------------------------------------------------------------

@functools.cache
def api_modules(pkg_dir:Path=REPO/PACKAGE)->tuple[str, ...]:
    "The public modules of the package, found in its folder (nothing imported): no part of the name starts with '_'"
    mods = []
    for p in sorted(pkg_dir.rglob('*.py')):
        rel = p.relative_to(pkg_dir.parent).with_suffix('').parts
        if rel[-1] == '__init__': rel = rel[:-1]
        if any(part.startswith('_') for part in rel): continue
        mods.append('.'.join(rel))
    return tuple(sorted(mods, key=lambda m: m.split('.')))


def api_pages()->list:
    "One page per public module (`::: cifar_kit.core`), and their part of the nav: top-level modules, then a group per subpackage"
    nav, groups = [], {}
    for mod in api_modules():
        rel = f"api/{mod}.md"
        (PAGES/rel).parent.mkdir(parents=True, exist_ok=True)
        (PAGES/rel).write_text(f"::: {mod}\n")
        parts = mod.split('.')
        sub = '.'.join(parts[:2]) if len(parts) > 1 else None
        if sub and (REPO/Path(*parts[:2])/'__init__.py').exists():
            if sub not in groups: groups[sub] = []; nav.append({sub: groups[sub]})
            groups[sub].append({mod: rel})
        else: nav.append({mod: rel})
    return nav


# ---------------------------------------------------------------------------------------------------------------------
# 6. mkdocs, and the offline check
# ---------------------------------------------------------------------------------------------------------------------

EXTRA_CSS = """
.md-grid { max-width: 82rem; }
.md-typeset math[display="block"] { margin: 1em 0; overflow-x: auto; overflow-y: hidden; }
.md-typeset .nb-html { overflow-x: auto; margin: 0 0 1em; }
.md-typeset .nb-html table { font-size: .7rem; border-collapse: collapse; }
.md-typeset .nb-html th, .md-typeset .nb-html td { border: 1px solid var(--md-default-fg-color--lightest); padding: .2em .6em; }
.md-typeset .nb-html thead th { background: var(--md-code-bg-color); }
.md-typeset .nb-not-run, .md-typeset .nb-widget { font-size: .7rem; color: var(--md-default-fg-color--light); margin-top: -.6em; }
.md-typeset .nb-output pre > code { background: transparent; border-left: .2rem solid var(--md-default-fg-color--lightest); }
.md-typeset .nb-output .md-clipboard { display: none; }
.md-typeset .nb-stderr pre > code { background: #fdf6ec; border-left-color: #e0b070; }
.md-typeset img { max-width: 100%; height: auto; }
"""


def mkdocs_config(nav:list)->dict:
    return {
        'site_name': 'cifar_kit',
        'site_description': 'A notebook-first kit to learn, reproduce and extend image classification in PyTorch',
        'docs_dir': str(PAGES), 'site_dir': str(SITE), 'use_directory_urls': True, 'strict': False,
        'theme': {'name': 'material', 'font': False,       # no Google Fonts: the system's fonts
                  'features': ['navigation.tabs', 'navigation.sections', 'navigation.top', 'navigation.footer',
                               'search.highlight', 'content.code.copy', 'toc.integrate'],
                  'palette': {'primary': 'indigo', 'accent': 'indigo'}},
        'extra': {'generator': False},
        'extra_css': ['assets/site.css'],
        'markdown_extensions': ['tables', 'admonition', 'attr_list', 'md_in_html', 'toc',
                                {'pymdownx.highlight': {'use_pygments': True}}, 'pymdownx.superfences', 'pymdownx.details'],
        'plugins': ['search', {'mkdocstrings': {'default_handler': 'python', 'handlers': {'python': {
            'paths': [str(REPO)], 'options': {
                'show_root_heading': True, 'show_root_full_path': True, 'show_source': False, 'members_order': 'source',
                'show_signature_annotations': True, 'separate_signature': True, 'show_if_no_docstring': True,
                'heading_level': 1, 'docstring_style': None, 'show_submodules': False, 'filters': ['!^_'],
                'line_length': 100, 'extensions': [f"{REPO/'docs'/'text_docstrings.py'}:TextDocstrings"]}}}}}],
        'nav': nav,
    }


_TAG = re.compile(r'<(script|img|source|iframe|link|audio|video|embed|track|image|object|use)\b([^>]*)>', re.I | re.S)
_ATTR = re.compile(r'''\b(src|href|srcset|data|poster|xlink:href)\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)''', re.I)
_CSS_URL = re.compile(r'''url\(\s*['"]?\s*((?:https?:)?//[^'")\s]*)''', re.I)
_CSS_IMPORT = re.compile(r'''@import\s+(?:url\(\s*)?['"]?\s*((?:https?:)?//[^'")\s;]*)''', re.I)
_REMOTE = re.compile(r'^\s*(?:https?:)?//', re.I)
_NAVIGATIONAL_RELS = {'canonical', 'alternate', 'author', 'license', 'next', 'prev', 'help', 'bookmark'}


def offline_problems(site:Path=SITE)->list[str]:
    """Every reference in the site's .html, .css and .js files that would make a browser fetch something from the internet:
    an http(s):// or protocol-relative // address in src/href/srcset of <script>, <img>, <source>, <iframe>, <link> (other
    than navigational rels), ..., or in CSS `url(...)` and `@import`. Plain links (<a href>) are allowed"""
    problems = []
    for f in sorted(site.rglob('*')):
        if f.suffix not in ('.html', '.css', '.js') or not f.is_file(): continue
        text, rel = f.read_text(errors='replace'), f.relative_to(site)
        if f.suffix in ('.html', '.js'):
            for m in _TAG.finditer(text):
                tag, attrs = m[1].lower(), m[2]
                if tag == 'link':
                    rels = re.search(r'''\brel\s*=\s*["']?([^"'>]*)''', attrs, re.I)
                    if rels and set(rels[1].lower().split()) <= _NAVIGATIONAL_RELS: continue
                for a in _ATTR.finditer(attrs):
                    vals = a[2].strip('"\'').split(',') if a[1].lower() == 'srcset' else [a[2].strip('"\'')]
                    problems += [f"{rel}: <{tag} {a[1]}={v.strip()}>" for v in vals if _REMOTE.match(v)]
        for rx in (_CSS_URL, _CSS_IMPORT):
            problems += [f"{rel}: {m[0].strip()}" for m in rx.finditer(text)
                         if not (rx is _CSS_URL and re.search(r'@import\s+$', text[max(0, m.start() - 20):m.start()]))]
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------------------------------

def _timings_path(size:str)->Path: return BUILD/f'timings-{size}.json'


def load_timings(size:str)->dict[str, float]:
    """Seconds each notebook took at `size` in the last build here (_build/), else as docs/results/course.json recorded
    them (the full size; a guess of the order at the CI size): the build starts the longest first, so that the workers end
    together"""
    if _timings_path(size).exists(): return json.loads(_timings_path(size).read_text())
    if COURSE_JSON.exists(): return json.loads(COURSE_JSON.read_text()).get('notebooks', {})
    return {}


STAMP = 'cifar_kit_site'   # an executed copy's metadata: the size it ran at, the hash of its notebook, its seconds


def _sha256(path:Path)->str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _resumable(nb_name:str, size:str)->dict|None:
    """With --resume: the result of notebook `nb_name` from its executed copy of an earlier build, if that copy ran to the
    end at this `size` from the notebook as it is now (same hash); else None, and the notebook runs again"""
    import nbformat
    out = EXECUTED/nb_name
    if not out.is_file(): return None
    nb = nbformat.read(out, as_version=4)
    stamp = nb.metadata.get(STAMP) or {}
    if stamp.get('size') != size or stamp.get('source_sha256') != _sha256(NBS/nb_name): return None
    run = cells_to_run(read_cells(NBS/nb_name), skip_flags())
    return dict(nb=nb_name, seconds=float(stamp['seconds']), size=size, resumed=True, **notebook_page(nb_name, nb, ran=run))


def _reuse(nb_name:str, size:str)->dict|None:
    "With --only, the other notebooks' pages come from their executed copies of an earlier build, or from the notebook itself"
    import nbformat
    src = EXECUTED/nb_name if (EXECUTED/nb_name).exists() else NBS/nb_name
    page = notebook_page(nb_name, nbformat.read(src, as_version=4))
    seconds = json.loads(_timings_path(size).read_text()).get(nb_name) if _timings_path(size).exists() else None
    return dict(nb=nb_name, seconds=seconds or 0.0, size=size, **page, reused='executed copy' if src != NBS/nb_name else 'not run')


def checkout_state(repo:Path=REPO)->dict[str, str]|None:
    """What `git status` shows of the checkout, with a hash of each changed or untracked file (so that a notebook that
    rewrites a file already changed is seen too); None outside a git checkout"""
    try: r = subprocess.run(['git', 'status', '--porcelain=v1', '-z', '--untracked-files=all'], cwd=repo, capture_output=True)
    except OSError: return None   # no git, or no such folder
    if r.returncode: return None
    out = {}
    for entry in filter(None, r.stdout.decode(errors='replace').split('\0')):
        f = repo/entry[3:]
        out[entry[3:]] = entry[:2] + (':' + _sha256(f) if f.is_file() and not f.is_symlink() else '')
    return out


def checkout_changes(before:dict|None, after:dict|None)->list[str]:
    "The files running the notebooks added, changed or removed in the checkout, as `git status` names them"
    if before is None or after is None: return []
    return sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))


def build(size:str='ci', jobs:int=2, allow_missing:bool=False, only:list[str]|None=None, cell_timeout:int|None=1800,
          fresh_kernels:bool=False, resume:bool=False)->dict:
    "Build _site/ (see the module's docstring); returns a summary. Raises `BuildError` naming what failed"
    t0 = time.perf_counter()
    course = load_course()
    missing = check_course(course, allow_missing)
    entries = [e for e in course_entries(course) if e['nb'] not in missing]
    names = [e['nb'] for e in entries]
    only = [str(Path(o).resolve().relative_to(NBS).as_posix()) if Path(o).exists() else o for o in (only or [])]
    if bad := [o for o in only if o not in names]: raise BuildError(f"--only: not notebooks of the course: {', '.join(bad)}")
    # every formula first: a bad one fails the build before anything runs
    import nbformat
    bad_math = []
    for nb in names:
        for c in nbformat.read(NBS/nb, as_version=4).cells:
            if c.cell_type == 'markdown': bad_math += [f"{nb}: {e}" for e in markdown_math(c.source)[1]]
    if bad_math: raise BuildError("formulas latex2mathml cannot convert (fix them in the notebook):\n  " + '\n  '.join(bad_math))

    for d in (PAGES, BUILD/'logs'): shutil.rmtree(d, ignore_errors=True)   # the kernels' logs are this build's
    PAGES.mkdir(parents=True)
    timings = load_timings(size)
    todo = sorted(only or names, key=lambda n: -timings.get(n, 1e9))   # longest first (unknown: first of all)
    done, failures, t_run = {}, [], time.perf_counter()
    if resume:   # a whole build that an earlier one, stopped or failed, got part way through
        for nb in list(todo):
            if r := _resumable(nb, size): done[nb] = r; todo.remove(nb)
        log(f"--resume: {len(done)} notebooks taken from their executed copies at size {size!r} (same notebook, ran to the end)")
    log(f"running {len(todo)} notebooks at size {size!r}, {jobs} at a time")
    before = checkout_state()   # Run All is safe: running the notebooks must leave the checkout as it was
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
        futs = {pool.submit(run_notebook, nb, size, cell_timeout, fresh_kernels): nb for nb in todo}
        for fut in concurrent.futures.as_completed(futs):
            nb = futs[fut]
            try: r = fut.result()
            except BuildError as e: r = dict(nb=nb, seconds=0.0, error=str(e))
            except Exception as e: r = dict(nb=nb, seconds=0.0, error=f"{nb}: {type(e).__name__}: {e}")
            log(f"  {'FAILED' if 'error' in r else 'ok':6} {r['seconds']:7.1f} s  {nb}")
            if 'error' in r: failures.append(r['error'])
            else: done[nb] = r
            if r['seconds']: timings[nb] = round(r['seconds'], 1)
    t_run = time.perf_counter() - t_run
    _timings_path(size).write_text(json.dumps(timings, indent=1) + '\n')   # the next build's order
    if failures: raise BuildError(f"{len(failures)} notebook(s) failed:\n\n" + '\n\n'.join(failures))
    if changed := checkout_changes(before, checkout_state()):
        raise BuildError(f"running the notebooks changed {len(changed)} file(s) of the checkout (`git status`); a lesson "
                         "must write into a temporary folder:\n  " + '\n  '.join(changed[:50]))
    if before is not None: log("checkout check: passed, running the notebooks left `git status` as it was")
    if rest := [nb for nb in names if nb not in done]:
        for nb in rest: done[nb] = _reuse(nb, size)
        log(f"  --only: {sum(done[nb]['reused'] == 'executed copy' for nb in rest)} other pages from an earlier build's "
            f"executed notebooks, {sum(done[nb]['reused'] == 'not run' for nb in rest)} without outputs (never run here)")

    home_page(course, done, size)
    course_nav, ref_nav = [{'Home': page_path(course['home'])}], []
    for e in entries[1:]:
        target = course_nav if e['section'] == 'Course' else ref_nav
        if not target or not isinstance(target[-1], dict) or list(target[-1]) != [e['part']]: target.append({e['part']: []})
        target[-1][e['part']].append({done[e['nb']]['title']: page_path(e['nb'])})
    nav = [{'Course': course_nav}, {'Reference': ref_nav}, {'API': api_pages()}]
    (PAGES/'assets').mkdir(exist_ok=True)
    (PAGES/'assets'/'site.css').write_text(EXTRA_CSS.lstrip())
    (BUILD/'mkdocs.yml').write_text(yaml.safe_dump(mkdocs_config(nav), sort_keys=False, allow_unicode=True))
    log("mkdocs build")
    t_mkdocs = time.perf_counter()
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--quiet', '--clean', '-f', str(BUILD/'mkdocs.yml')],
                       cwd=BUILD, capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING='1'))
    if r.returncode: raise BuildError(f"mkdocs build failed:\n{r.stdout[-3000:]}{r.stderr[-5000:]}")
    if r.stderr.strip(): log(r.stderr.strip())
    t_mkdocs = time.perf_counter() - t_mkdocs
    problems = offline_problems(SITE)
    n_pages = sum(1 for p in SITE.rglob('index.html'))
    if problems: raise BuildError(f"offline check: {len(problems)} reference(s) to the internet in _site/:\n  " + '\n  '.join(problems[:50]))
    if size == 'full' and not only:
        write_course_json(course_record(course, done, size)); log(f"wrote {COURSE_JSON.relative_to(REPO)}")
        if stale := sync_course_maps(): log(f"the course map of {' and '.join(stale)} now shows this build's results")
    elif size == 'full':
        rerun = update_course_json(course_record(course, {nb: done[nb] for nb in only}, size), only)
        log(f"--only: {COURSE_JSON.relative_to(REPO)}: the rows of {', '.join(rerun) or 'no lesson'} from this build, "
            "the others as the last whole build measured them")
        if stale := sync_course_maps(): log(f"the course map of {' and '.join(stale)} now shows this build's results")
    secs = time.perf_counter() - t0
    n_files = sum(1 for f in SITE.rglob('*') if f.suffix in ('.html', '.css', '.js'))
    log(f"\nsite: {SITE.relative_to(REPO)}/ with {n_pages} pages ({len(names)} notebooks, {len(api_modules())} API modules)")
    log(f"offline check: passed, no reference to the internet in {n_files} .html/.css/.js files")
    log(f"built in {secs:.0f} s ({secs/60:.1f} min): the notebooks {t_run:.0f} s (their own times add up to "
        f"{sum(d['seconds'] for d in done.values() if 'reused' not in d):.0f} s), mkdocs {t_mkdocs:.0f} s")
    return dict(seconds=secs, pages=n_pages, notebooks=len(names), done=done)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--size', choices=SIZES, default='ci', help="the lessons' size: 'full' (make docs) or 'ci' (make site, the tests)")
    ap.add_argument('--jobs', type=int, default=2, help='notebooks run at once (default 2)')
    ap.add_argument('--allow-missing', action='store_true', help='skip, with a warning, notebooks course.yml names that do not exist')
    ap.add_argument('--only', nargs='+', metavar='NB', help='run only these notebooks (nbs/04_resnet.ipynb or 04_resnet.ipynb); '
                    'the others reuse their executed copies of an earlier build')
    ap.add_argument('--cell-timeout', type=int, default=1800, help='seconds one cell may run (0: no limit; default 1800)')
    ap.add_argument('--fresh-kernels', action='store_true', help='a new kernel for every notebook, as a student opens it '
                    '(slower: every notebook imports torch again); by default each worker keeps its kernel, as nbdev-test does')
    ap.add_argument('--sync-readme', action='store_true', help="only rewrite the course maps of README.md and nbs/index.ipynb "
                    "from docs/course.yml and docs/results/course.json (a full build does it too)")
    ap.add_argument('--resume', action='store_true', help='take each notebook whose executed copy in _build/ ran to the end '
                    'at this size from the notebook as it is now, and run only the others (after a build that failed or was stopped)')
    a = ap.parse_args(argv)
    if a.sync_readme:
        stale = sync_course_maps()
        return log(f"rewrote the course map of {' and '.join(stale)}" if stale else "the course maps are up to date")
    try: build(a.size, a.jobs, a.allow_missing, a.only, a.cell_timeout or None, a.fresh_kernels, a.resume)
    except BuildError as e:
        print(f"\nsite build failed: {e}", file=sys.stderr); sys.exit(1)


if __name__ == '__main__': main()
