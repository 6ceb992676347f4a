//! A blocking etcd client for the control paths (the directory, holds): one current-thread
//! runtime and one connection, used from one thread at a time. The lease keeps its own (its
//! renewal stream runs on a thread of its own, `lease.rs`).

use etcd_client::{Client, GetOptions, Txn, TxnResponse};

use super::lease::{connect, LeaseConfig, LeaseError};

pub struct Etcd {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Etcd {
    pub fn connect(cfg: &LeaseConfig) -> Result<Etcd, LeaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| LeaseError::Etcd(e.to_string()))?;
        let client = rt.block_on(connect(cfg))?;
        Ok(Etcd { rt, client })
    }

    /// Every key under `prefix` with its value.
    pub fn get_prefix(&mut self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, LeaseError> {
        let r = self.rt.block_on(
            self.client
                .get(prefix, Some(GetOptions::new().with_prefix())),
        )?;
        Ok(r.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect())
    }

    /// The value of `key`, if it is there.
    pub fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, LeaseError> {
        let r = self.rt.block_on(self.client.get(key, None))?;
        Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
    }

    pub fn txn(&mut self, txn: Txn) -> Result<TxnResponse, LeaseError> {
        Ok(self.rt.block_on(self.client.txn(txn))?)
    }
}
