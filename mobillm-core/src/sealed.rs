//! Files sealed at rest with a key the app supplies (from its platform keystore): XChaCha20-Poly1305, a fresh
//! random 24-byte nonce per write, the format tag as associated data. A sealed file is
//!
//! ```text
//! "MBLSEAL1" | nonce (24 bytes) | ciphertext and 16-byte tag
//! ```
//!
//! Opening checks the tag: a wrong key, a damaged or truncated file, or a file of another format is an error
//! naming the file, never garbage. The device adapter uses this (it holds the session's secret seed), as does
//! a resumable fine-tune's record (`fine_tune::state`). [`write_atomically`] writes either kind crash-safely.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::TryRngCore;

use crate::error::{Error, Result};

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
const MAGIC: &[u8; 8] = b"MBLSEAL1";
const NONCE_LEN: usize = 24;

/// Refuses a key of the wrong length, naming it as `what` ("an encryption key is 32 bytes, not 16").
pub fn check_key(key: &[u8], what: &str) -> Result<()> {
    if key.len() != KEY_LEN {
        return Err(Error::InvalidInput(format!("{what} is {KEY_LEN} bytes, not {}", key.len())));
    }
    Ok(())
}

fn cipher(key: &[u8]) -> Result<XChaCha20Poly1305> {
    check_key(key, "an encryption key")?;
    Ok(XChaCha20Poly1305::new(key.into()))
}

/// Whether `bytes` start like a sealed file.
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Encrypts and authenticates `plaintext` under `key`.
pub fn seal(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let cipher = cipher(key)?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.try_fill_bytes(&mut nonce).map_err(|e| Error::Internal(format!("OS RNG: {e}")))?;
    let sealed = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad: MAGIC })
        .map_err(|_| Error::Internal("encryption failed".into()))?;
    let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Decrypts a sealed file's bytes (`path` names it in errors).
pub fn open(key: &[u8], bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let invalid = |reason: &str| Error::InvalidModelFile { path: path.to_path_buf(), reason: reason.to_string() };
    let cipher = cipher(key)?;
    if !is_sealed(bytes) {
        return Err(invalid("not an encrypted MobiLLM file"));
    }
    let body = &bytes[MAGIC.len()..];
    if body.len() < NONCE_LEN + 16 {
        return Err(invalid("the encrypted file is truncated"));
    }
    let (nonce, sealed) = body.split_at(NONCE_LEN);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: MAGIC })
        .map_err(|_| invalid("does not open with this key (a wrong key, or the file was changed)"))
}

/// Writes `bytes` to `path` so that a crash at any instant leaves either the old file or the new one, whole: a
/// temporary file in the same directory, fsync, rename over `path`, fsync of the directory (the rename itself is
/// then durable too).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| Error::io(dir, e))?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    // Directories cannot be opened for syncing everywhere (Windows); where they can, a failure is real.
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_only_with_their_key_and_unchanged() {
        let (key, other) = ([7u8; KEY_LEN], [8u8; KEY_LEN]);
        let path = Path::new("adapter.safetensors");
        let sealed = seal(&key, b"the secret seed").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.windows(6).any(|w| w == b"secret"), "the plaintext does not show");
        assert_eq!(open(&key, &sealed, path).unwrap(), b"the secret seed");
        assert_ne!(seal(&key, b"the secret seed").unwrap(), sealed, "a fresh nonce per write");
        assert!(matches!(open(&other, &sealed, path), Err(Error::InvalidModelFile { .. })));
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(open(&key, &flipped, path), Err(Error::InvalidModelFile { .. })));
        assert!(matches!(open(&key, &sealed[..20], path), Err(Error::InvalidModelFile { .. })));
        assert!(matches!(open(&key, b"plain safetensors", path), Err(Error::InvalidModelFile { .. })));
        assert!(matches!(seal(&[1u8; 16], b"x"), Err(Error::InvalidInput(_))));
    }
}
