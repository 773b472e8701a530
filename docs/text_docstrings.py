"""A griffe extension for the site's API pages (docs/build.py hands it to mkdocstrings): the package's docstrings are
nbdev's plain text with `code` in backticks, and Markdown would take a '<' in them for an HTML tag ('timm/<name>',
'<root>/<recipe>/seed<seed>'), swallowing the words and the rest of the page into it. Each '<' outside code becomes '&lt;'."""
import re
from griffe import Extension

_CODE = re.compile(r'(`+)(.+?)\1', re.S)


def text_docstring(doc:str)->str:
    "`doc` with every '<' outside its code spans as '&lt;'"
    out, last = [], 0
    for m in _CODE.finditer(doc):
        out += [doc[last:m.start()].replace('<', '&lt;'), m[0]]; last = m.end()
    return ''.join(out) + doc[last:].replace('<', '&lt;')


class TextDocstrings(Extension):
    "Every docstring of every object griffe loads, as text (see the module's docstring)"
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None: obj.docstring.value = text_docstring(obj.docstring.value)
