//! VDI and snapshot records, and the keys they are filed under in the registry B+tree
//! (FORMAT.md §6).

use super::{
    error::{StoreError, StoreResult},
    format::{
        height_for, put_u16, put_u64, u16_at, u64_at, Ptr, MAX_HEIGHT, MAX_VDI_BYTES, PTR_LEN,
    },
};

/// Byte offsets of a record's fields (FORMAT.md §6); the two length-prefixed names follow
/// the fixed part, then (format 5, only when set) the length-prefixed backing URI.
mod at {
    pub const KIND: usize = 0;
    pub const HEIGHT: usize = 1;
    pub const ID: usize = 8;
    pub const SIZE: usize = 16;
    pub const ROOT: usize = 24;
    pub const GUID: usize = 56;
    pub const CREATED: usize = 64;
    pub const PARENT: usize = 72;
    pub const ORIGIN: usize = 80;
    pub const NAMES: usize = 88;
}
const KIND_VDI: u8 = 1;
const KIND_SNAPSHOT: u8 = 2;

/// Longest VDI or snapshot name, in bytes.
pub const MAX_NAME: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Vdi,
    Snapshot,
}

/// One VDI or snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub height: u8,
    pub id: u64,
    pub size: u64,
    pub root: Ptr,
    pub created_ns: u64,
    /// For a snapshot: the VDI it is of.
    pub parent: u64,
    /// For a fork: the snapshot it was forked from.
    pub origin: u64,
    /// A VDI's name, or a snapshot's name without the `VDI@` part.
    pub name: String,
    /// The origin's full name when the fork was made (for display once it is gone).
    pub origin_name: String,
    /// A received snapshot's identity in the store it was sent from (format 3); 0 for
    /// everything else, whose identity is derived ([`Store::snapshot_identity`]).
    ///
    /// [`Store::snapshot_identity`]: super::Store::snapshot_identity
    pub guid: u64,
    /// The NBD export this VDI reads through where its map has holes (format 5): a
    /// *remote-backed* VDI, whose holes mean "not here yet" rather than zeros
    /// (`store::backing`). Snapshots and forks inherit it.
    pub backing: Option<String>,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; at::NAMES];
        b[at::KIND] = match self.kind {
            Kind::Vdi => KIND_VDI,
            Kind::Snapshot => KIND_SNAPSHOT,
        };
        b[at::HEIGHT] = self.height;
        put_u64(&mut b, at::ID, self.id);
        put_u64(&mut b, at::SIZE, self.size);
        self.root.encode(&mut b[at::ROOT..at::ROOT + PTR_LEN]);
        put_u64(&mut b, at::GUID, self.guid);
        put_u64(&mut b, at::CREATED, self.created_ns);
        put_u64(&mut b, at::PARENT, self.parent);
        put_u64(&mut b, at::ORIGIN, self.origin);
        let backing = self.backing.iter();
        for s in [&self.name, &self.origin_name].into_iter().chain(backing) {
            let at = b.len();
            b.resize(at + 2 + s.len(), 0);
            put_u16(&mut b, at, s.len() as u16);
            b[at + 2..].copy_from_slice(s.as_bytes());
        }
        b
    }

    pub fn decode(b: &[u8]) -> StoreResult<Record> {
        let bad = |why: &str| StoreError::Corrupt(format!("registry record: {why}"));
        if b.len() < at::NAMES + 4 {
            return Err(bad("too short"));
        }
        let kind = match b[at::KIND] {
            KIND_VDI => Kind::Vdi,
            KIND_SNAPSHOT => Kind::Snapshot,
            k => return Err(bad(&format!("unknown kind {k}"))),
        };
        let mut pos = at::NAMES;
        let mut string = || -> StoreResult<String> {
            let n = b
                .get(pos..pos + 2)
                .map(|l| u16_at(l, 0) as usize)
                .ok_or_else(|| bad("name runs past the record"))?;
            let s = b
                .get(pos + 2..pos + 2 + n)
                .ok_or_else(|| bad("name runs past the record"))?;
            pos += 2 + n;
            String::from_utf8(s.to_vec()).map_err(|_| bad("name is not UTF-8"))
        };
        let name = string()?;
        let origin_name = string()?;
        let backing = if at::NAMES + 4 + name.len() + origin_name.len() < b.len() {
            Some(string()?).filter(|s| !s.is_empty())
        } else {
            None
        };
        let r = Record {
            kind,
            height: b[at::HEIGHT],
            id: u64_at(b, at::ID),
            size: u64_at(b, at::SIZE),
            root: Ptr::decode(&b[at::ROOT..at::ROOT + PTR_LEN]),
            created_ns: u64_at(b, at::CREATED),
            parent: u64_at(b, at::PARENT),
            origin: u64_at(b, at::ORIGIN),
            name,
            origin_name,
            guid: u64_at(b, at::GUID),
            backing,
        };
        r.root.kind()?;
        if r.height == 0 || r.height > MAX_HEIGHT {
            return Err(bad(&format!("radix height {}", r.height)));
        }
        if r.size > MAX_VDI_BYTES || r.height < height_for(r.size) {
            return Err(bad(&format!(
                "size {} does not fit a radix map of height {}",
                r.size, r.height
            )));
        }
        Ok(r)
    }
}

/// A record's kind and the ids it points at, read without decoding its names (walks over
/// many records decode only the ones they keep).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Links {
    pub kind: Kind,
    pub id: u64,
    pub parent: u64,
    pub origin: u64,
}

impl Links {
    pub fn peek(b: &[u8]) -> StoreResult<Links> {
        if b.len() < at::NAMES {
            return Err(StoreError::Corrupt("registry record: too short".into()));
        }
        Ok(Links {
            kind: if b[at::KIND] == KIND_SNAPSHOT {
                Kind::Snapshot
            } else {
                Kind::Vdi
            },
            id: u64_at(b, at::ID),
            parent: u64_at(b, at::PARENT),
            origin: u64_at(b, at::ORIGIN),
        })
    }
}

pub fn name_key(name: &str) -> Vec<u8> {
    let mut k = vec![b'N'];
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn record_key(id: u64) -> Vec<u8> {
    let mut k = vec![b'R'];
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn snapshot_prefix(vdi: u64) -> Vec<u8> {
    let mut k = vec![b'S'];
    k.extend_from_slice(&vdi.to_be_bytes());
    k
}

pub fn snapshot_key(vdi: u64, snap: &str) -> Vec<u8> {
    let mut k = snapshot_prefix(vdi);
    k.extend_from_slice(snap.as_bytes());
    k
}

pub fn decode_id(v: &[u8]) -> StoreResult<u64> {
    v.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| StoreError::Corrupt("registry id entry is not 8 bytes".into()))
}

/// Whether `name` is one the store gives itself (a VDI under construction, a remote
/// export's cache): user names never start with `.`, and listings leave these out.
pub fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Checks a VDI or snapshot name: 1–200 bytes of letters, digits and `._+-:`, not starting
/// with `-` or `.`.
pub fn validate_name(name: &str, what: &str) -> StoreResult<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._+-:".contains(c);
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(StoreError::Invalid(format!(
            "{what} name must be 1 to {MAX_NAME} bytes long"
        )));
    }
    if name.starts_with(['-', '.']) || !name.chars().all(ok_char) {
        return Err(StoreError::Invalid(format!(
            "invalid {what} name {name:?}: use letters, digits and . _ + - : (not first: - .)"
        )));
    }
    Ok(())
}

/// Splits `NAME@SNAP` into its parts; a plain `NAME` has no snapshot part.
pub fn split_name(full: &str) -> StoreResult<(&str, Option<&str>)> {
    match full.split_once('@') {
        None => Ok((full, None)),
        Some((v, s)) if !s.contains('@') => Ok((v, Some(s))),
        _ => Err(StoreError::Invalid(format!(
            "invalid name {full:?}: more than one '@'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_validation() {
        let r = Record {
            kind: Kind::Snapshot,
            height: 4,
            id: 42,
            size: 10 << 30,
            root: Ptr::block(900, [5; 24]),
            created_ns: 123,
            parent: 7,
            origin: 0,
            name: "gold".into(),
            origin_name: "template@v1".into(),
            guid: 0x1234,
            backing: None,
        };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        let backed = Record {
            backing: Some("nbds://a.example/gold?tls-psk-file=/k".into()),
            ..r.clone()
        };
        assert_eq!(Record::decode(&backed.encode()).unwrap(), backed);
        // A record without a backing is byte for byte what format 4 wrote.
        assert_eq!(r.encode().len(), at::NAMES + 2 + 4 + 2 + 11);
        let l = Links::peek(&r.encode()).unwrap();
        assert_eq!(
            (l.kind, l.id, l.parent, l.origin),
            (r.kind, r.id, r.parent, r.origin)
        );
        let mut bad = r.encode();
        bad[0] = 9;
        assert!(Record::decode(&bad).is_err());
        // A size the radix map cannot address (found by fuzzing: reads ran past the tree).
        let mut big = r.clone();
        big.size = 1 << 42;
        assert!(Record::decode(&big.encode()).is_err());
        assert!(Record::decode(&r.encode()[..50]).is_err());
        assert!(validate_name("vm-01.disk", "VDI").is_ok());
        assert!(validate_name("a@b", "VDI").is_err());
        assert!(validate_name("-x", "VDI").is_err());
        assert!(validate_name("", "VDI").is_err());
        assert_eq!(split_name("a@b").unwrap(), ("a", Some("b")));
        assert!(split_name("a@b@c").is_err());
    }
}
