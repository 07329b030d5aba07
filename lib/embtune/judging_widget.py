"""The judging screen of notebook 00: one query and one document at a time, a grade by button or by key, every act
saved to the journal as it is made (embtune.judging.Journal). ipywidgets' core widgets only, which Jupyter and
Colab both render; the logic is the journal's, so it is tested without a browser."""

from __future__ import annotations

import html

import ipywidgets as widgets

from .judging import GRADES, Judging, next_pair

KEYS = {**{str(g): g for g in GRADES}, "s": "skip", "u": "undo"}


class JudgingScreen:
    """`display(JudgingScreen(judging).box)`; `grade(g)`, `skip()` and `undo()` are what the buttons and keys do."""

    def __init__(self, judging: Judging, judge: str = "person", max_chars: int = 3000):
        self.judging, self.judge, self.max_chars = judging, judge, max_chars
        self.progress = widgets.HTML()
        self.query = widgets.HTML()
        self.document = widgets.HTML(layout=widgets.Layout(max_height="320px", overflow="auto",
                                                           border="1px solid #ccc", padding="6px"))  # fmt: skip
        buttons = [self._button(f"{g} {name}", lambda _, g=g: self.grade(g)) for g, name in GRADES.items()]
        buttons += [self._button("skip", lambda _: self.skip()), self._button("undo", lambda _: self.undo())]
        self.keys = widgets.Text(placeholder="or type 0-3, s (skip), u (undo) here", continuous_update=True)
        self.keys.observe(self._key, names="value")
        self.box = widgets.VBox([self.progress, self.query, self.document, widgets.HBox(buttons), self.keys])
        self.pair = None
        self.show()

    @staticmethod
    def _button(label, act):
        button = widgets.Button(description=label, layout=widgets.Layout(width="auto"))
        button.on_click(act)
        return button

    def _key(self, change):
        key = change["new"].strip().lower()[-1:]
        if key:
            self.keys.value = ""
            act = KEYS.get(key)
            if act == "skip":
                self.skip()
            elif act == "undo":
                self.undo()
            elif act is not None:
                self.grade(act)

    def grade(self, grade: int) -> None:
        if self.pair:
            self.judging.journal.grade(*self.pair, grade, self.judge)
        self.show()

    def skip(self) -> None:
        if self.pair:
            self.judging.journal.skip(*self.pair, self.judge)
        self.show()

    def undo(self) -> None:
        """Take back the latest grade or skip: its pair comes back on screen."""
        self.judging.journal.undo(self.judge)
        self.show()

    def show(self) -> None:
        """Put the next pair not yet graded or skipped on screen, with the progress."""
        pairs, journal = self.judging.pairs, self.judging.journal
        seen, graded = journal.seen(self.judge), journal.grades(self.judge)
        done = sum(p in seen for p in pairs)
        skipped = sum(p in seen and p not in graded for p in pairs)
        self.pair = next_pair(pairs, journal, self.judge)
        self.progress.value = (f"<b>{done} of {len(pairs)}</b> pairs judged ({skipped} skipped) · "
                               f"{len(self.judging.queries)} queries")  # fmt: skip
        if self.pair is None:
            self.query.value = "<b>All pairs judged.</b> Run the next cells to write the qrels."
            self.document.value = ""
            return
        q, d = self.pair
        text = self.judging.docs[d]
        cut = "…" if len(text) > self.max_chars else ""
        self.query.value = f"<b>Query</b> ({q}): {html.escape(self.judging.queries[q])}"
        self.document.value = f"<b>Document</b> ({d}):<br>{html.escape(text[: self.max_chars]) + cut}"
