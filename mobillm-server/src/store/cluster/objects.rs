//! The cluster store's objects: an S3 bucket (or a directory) under a prefix, every object of a session under
//! `{prefix}/sessions/{id}/` — `chunks/{name}` (one upload's activations, f16, row after row) and
//! `weights/{name}` (a checkpoint) — so deleting a session is deleting a prefix. Names are random: an object is
//! never overwritten, so a writer that lost its claim cannot spoil what another wrote.

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::store::StoreError;

pub struct Objects {
    store: Box<dyn ObjectStore>,
    prefix: ObjectPath,
}

impl Objects {
    /// `s3://bucket[/prefix]` (credentials, region and endpoint from the usual `AWS_*` variables) or
    /// `file:///directory` (created if missing).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let parsed = url::Url::parse(url).map_err(|e| StoreError(format!("bad --object-store {url}: {e}")))?;
        let bad = |e: object_store::Error| StoreError(format!("object store {url}: {e}"));
        match parsed.scheme() {
            "s3" => {
                let bucket =
                    parsed.host_str().ok_or_else(|| StoreError(format!("--object-store {url} names no bucket")))?;
                let store =
                    object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket).build().map_err(bad)?;
                Ok(Self { store: Box::new(store), prefix: ObjectPath::from(parsed.path().trim_matches('/')) })
            }
            "file" => {
                let dir = parsed.to_file_path().map_err(|_| StoreError(format!("bad --object-store {url}")))?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(bad)?;
                Ok(Self { store: Box::new(store), prefix: ObjectPath::from("") })
            }
            other => Err(StoreError(format!("--object-store {url}: unknown scheme {other} (s3:// or file://)"))),
        }
    }

    fn session(&self, session: &str) -> ObjectPath {
        self.prefix.child("sessions").child(session)
    }

    /// A fresh object name for one of the session's `kind` (`chunks`, `weights`).
    pub fn new_key(&self, session: &str, kind: &str) -> ObjectPath {
        self.session(session).child(kind).child(format!("{:032x}", rand::random::<u128>()))
    }

    pub async fn put(&self, path: &ObjectPath, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.store.put(path, PutPayload::from(bytes)).await.map_err(obj)?;
        Ok(())
    }

    pub async fn get(&self, path: &ObjectPath) -> Result<Bytes, StoreError> {
        self.store.get(path).await.map_err(obj)?.bytes().await.map_err(obj)
    }

    /// Deletes an object nothing refers to; a failure leaves garbage under the session's prefix, which goes
    /// with the session.
    pub async fn delete_unreferenced(&self, path: &ObjectPath) {
        if let Err(e) = self.store.delete(path).await {
            tracing::warn!(object = %path, error = %e, "cannot delete an unreferenced object");
        }
    }

    /// Deletes every object of a session.
    pub async fn delete_session(&self, session: &str) -> Result<(), StoreError> {
        let prefix = self.session(session);
        let listed = self.store.list(Some(&prefix)).map(|m| m.map(|m| m.location)).boxed();
        let mut deleted = self.store.delete_stream(listed);
        while let Some(result) = deleted.next().await {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(obj(e)),
            }
        }
        Ok(())
    }

    /// How many objects a session has (none once it is deleted).
    pub async fn count_session(&self, session: &str) -> Result<usize, StoreError> {
        let prefix = self.session(session);
        let mut listed = self.store.list(Some(&prefix));
        let mut n = 0;
        while let Some(meta) = listed.next().await {
            meta.map_err(obj)?;
            n += 1;
        }
        Ok(n)
    }
}

fn obj(e: object_store::Error) -> StoreError {
    StoreError(format!("object store: {e}"))
}
