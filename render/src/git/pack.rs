//! Writing many objects at once as one Git pack: a file per object costs a
//! file system round trip each, and libgit2 rescans the pack directory
//! before writing every object it has not seen. A pack is one stream,
//! compressed on every core and indexed by libgit2.

use std::io::Write as _;

use flate2::Compression;
use flate2::write::ZlibEncoder;
use git2::ObjectType;
use sha1::Digest as _;

use crate::{Error, Result};

/// What counts as a large object (see [`entries`]).
const LARGE: usize = 64 * 1024;

/// How many objects are compressed (on every core) before being written.
const BATCH: usize = 4096;

/// Writes `objects` into the repository as one pack.
pub(crate) fn write(odb: &git2::Odb<'_>, objects: &[(ObjectType, &[u8])]) -> Result<()> {
    let count = u32::try_from(objects.len()).map_err(|_| Error::Git {
        message: format!("{} objects do not fit in one pack", objects.len()),
    })?;
    let mut hasher = sha1::Sha1::new();
    let mut writer = odb.packwriter().map_err(crate::Error::from)?;
    let mut put = |bytes: &[u8]| -> Result<()> {
        hasher.update(bytes);
        writer.write_all(bytes).map_err(|_| pack_error())
    };
    let mut header = b"PACK".to_vec();
    header.extend_from_slice(&2u32.to_be_bytes());
    header.extend_from_slice(&count.to_be_bytes());
    put(&header)?;
    // A batch at a time, so that no more than a batch's compressed entries
    // wait to be written.
    for batch in objects.chunks(BATCH) {
        for part in crate::parallel::chunks(batch, entries) {
            put(&part)?;
        }
    }
    let trailer = hasher.finalize();
    writer.write_all(&trailer).map_err(|_| pack_error())?;
    writer.commit().map_err(crate::Error::from)?;
    Ok(())
}

/// libgit2's reason, which its stream hides behind a generic I/O error.
fn pack_error() -> Error {
    Error::Git {
        message: format!(
            "failed to write a pack: {}",
            git2::Error::last_error(-1).message()
        ),
    }
}

/// The pack entries of `objects`: a type-and-size header, then the
/// zlib-compressed content, undeltified.
fn entries(objects: &[(ObjectType, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (kind, content) in objects {
        let code: u8 = match kind {
            ObjectType::Commit => 1,
            ObjectType::Tree => 2,
            ObjectType::Blob => 3,
            _ => 4,
        };
        let mut size = content.len();
        let mut byte = (code << 4) | (size & 0x0f) as u8;
        size >>= 4;
        while size > 0 {
            out.push(byte | 0x80);
            byte = (size & 0x7f) as u8;
            size >>= 7;
        }
        out.push(byte);
        // A large object is a directory of thousands of instances: mostly
        // object ids, which no level compresses, so the fastest level
        // stores it nearly as small in a fraction of the time.
        let level = if content.len() > LARGE {
            Compression::fast()
        } else {
            Compression::default()
        };
        let mut encoder = ZlibEncoder::new(&mut out, level);
        // Writing into a Vec cannot fail.
        let _ = encoder.write_all(content);
        let _ = encoder.finish();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_pack_is_read_back_by_libgit2() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let repo = git2::Repository::init_bare(dir.path())?;
        let big = vec![b'x'; 70_000];
        // Each object once: libgit2 refuses a pack that holds one twice.
        let objects: Vec<(ObjectType, &[u8])> = vec![
            (ObjectType::Blob, b"hello\n"),
            (ObjectType::Blob, &big),
            (ObjectType::Blob, b""),
        ];
        write(&repo.odb()?, &objects)?;
        for (_, content) in &objects {
            let id = git2::Oid::hash_object(ObjectType::Blob, content)?;
            assert_eq!(repo.find_blob(id)?.content(), *content);
        }
        let packs = std::fs::read_dir(dir.path().join("objects/pack"))?.count();
        assert_eq!(packs, 2, "one .pack and its .idx");
        Ok(())
    }

    #[test]
    fn objects_of_several_batches_make_one_pack() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let repo = git2::Repository::init_bare(dir.path())?;
        let contents: Vec<Vec<u8>> = (0..BATCH * 2 + 7)
            .map(|i| format!("object {i}\n").into_bytes())
            .collect();
        let objects: Vec<(ObjectType, &[u8])> = contents
            .iter()
            .map(|c| (ObjectType::Blob, c.as_slice()))
            .collect();
        write(&repo.odb()?, &objects)?;
        for content in [&contents[0], &contents[BATCH], &contents[BATCH * 2 + 6]] {
            let id = git2::Oid::hash_object(ObjectType::Blob, content)?;
            assert_eq!(repo.find_blob(id)?.content(), content.as_slice());
        }
        let mut count = 0;
        repo.odb()?.foreach(|_| {
            count += 1;
            true
        })?;
        assert_eq!(count, objects.len());
        let packs = std::fs::read_dir(dir.path().join("objects/pack"))?.count();
        assert_eq!(packs, 2, "one .pack and its .idx");
        Ok(())
    }
}
