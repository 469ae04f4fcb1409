"""Document Parquet files: which files of a stage output are read."""
from storage.documents import Document, DocumentWriter, count_documents, document_files, iter_documents


def test_a_workspace_under_a_folder_named_like_a_temp_dir_still_reads_its_documents(tmp_path):
    out = tmp_path / "sweep.tmp-2024" / "ws" / "stages" / "ingest" / "abc"      # the user's folder names
    with DocumentWriter(out / "src") as writer:
        writer.write_all(Document(f"d{i}", "text", "src") for i in range(3))
    with DocumentWriter(out / "src.tmp-99") as writer:                         # a temp dir inside the output
        writer.write(Document("half", "written", "src"))
    assert len(document_files(out)) == 1
    assert count_documents(out) == 3 and [d.id for d in iter_documents(out)] == ["d0", "d1", "d2"]
