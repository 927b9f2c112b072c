"""``python -m tools package --bundle NAME [--out DIR] [--base_url URL] [--update_hashes]``: a model-zoo release zip."""

from __future__ import annotations


def package(bundle: str, out: str = "dist", base_url: str | None = None, update_hashes: bool = False) -> None:
    """Write ``OUT/NAME.zip``, the bundle folder ``NAME/`` at its top, byte-for-byte reproducible; print its sha1.

    Args:
        bundle: a bundle name under ``bundles/`` (e.g. ``brats_mri_ldm3d``) or a bundle folder.
        out: output folder.
        base_url: host the large files instead of zipping them: the zip's ``large_files.yml`` points at
            ``BASE_URL/NAME/<path>`` and the files to upload are copied to ``OUT/NAME/<path>``. Without it the
            large files are inside the zip (and ``download_large_files`` only checks their hashes).
        update_hashes: after retraining, write the new sha256 of the large files into the bundle's
            ``large_files.yml`` instead of refusing the mismatch.
    """
    from common.bundle.release import write_release

    if not isinstance(update_hashes, bool):  # fire passes "false" as a string
        update_hashes = str(update_hashes).lower() in ("1", "true", "yes")
    info = write_release(bundle, out, base_url=base_url, update_hashes=update_hashes)
    print(f"{info['zip']}  ({info['name']} v{info['version']}, {len(info['files'])} files)")
    where = "inside the zip" if info["large_files_in_zip"] else f"to host under {out}/{info['name']}/"
    for e in info["large_files"]:
        print(f"  large file {e['path']}  {e['hash_type']} {e['hash_val']}  {where}" + (f"  url {e['url']}" if e["url"] else ""))
    if info["left_out"]:
        print(f"  left out: {', '.join(info['left_out'])}")
    print(f"sha1 {info['sha1']}")
