//! The one codec of the project: how values and keys become bytes.
//!
//! Two families of values are stored, and each carries a leading
//! format-version byte so that the layout can migrate later:
//!
//! * **OpenMLS entities** (`[ENTITY_FORMAT] ++ MessagePack`). OpenMLS 0.9
//!   uses `#[serde(untagged)]` and upstream only supports self-describing
//!   formats for its entities, so they never go through bincode. Byte
//!   strings are MessagePack `bin` values: a ratchet tree of 2,000 members
//!   takes about its TLS size instead of the 2-4 bytes per byte of JSON, and
//!   encodes and decodes several times faster.
//! * **The project's own records** (`[RECORD_FORMAT_V1] ++ bincode 2`), for
//!   types this project defines (server queues, SDK cursors, ...), written
//!   with [`crate::SledStorage::put_record`]. Decoding ([`decode_record`]) is
//!   bounded by a size limit (64 MiB) so a corrupt length field cannot drive
//!   an unbounded allocation.
//!
//! Keys of OpenMLS entities are the serde_json encoding of the OpenMLS key
//! value: deterministic for every key type OpenMLS uses, and short.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::StorageError;

/// Version byte in front of every stored OpenMLS entity (MessagePack).
pub(crate) const ENTITY_FORMAT: u8 = 2;
/// Version byte in front of every stored project record.
pub(crate) const RECORD_FORMAT_V1: u8 = 1;
/// Largest record the decoder will materialise.
pub(crate) const RECORD_SIZE_LIMIT: usize = 64 * 1024 * 1024;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<RECORD_SIZE_LIMIT>()
}

/// Encode an OpenMLS key (group id, hash reference, ...) for use inside a sled key.
pub(crate) fn encode_key<K: Serialize + ?Sized>(
    tree: &str,
    key: &K,
) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(key).map_err(|e| StorageError::Encode {
        tree: tree.to_owned(),
        reason: e.to_string(),
    })
}

/// Appends `value` to `out` in the MessagePack form the project stores
/// OpenMLS values in: byte strings as single `bin` values. Without that,
/// rmp-serde writes OpenMLS's byte vectors (keys, signatures, tree nodes)
/// as arrays of one integer per byte: twice the size and an encoder call
/// per byte. The delivery service encodes its groups' `PublicGroup`
/// entities with this too.
pub fn write_msgpack<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), rmp_serde::encode::Error> {
    let mut serializer =
        rmp_serde::Serializer::new(out).with_bytes(rmp_serde::config::BytesMode::ForceIterables);
    value.serialize(&mut serializer)
}

/// `value` in MessagePack, appended to `out`.
fn encode_into<T: Serialize + ?Sized>(
    tree: &str,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), StorageError> {
    write_msgpack(value, out).map_err(|e| StorageError::Encode {
        tree: tree.to_owned(),
        reason: e.to_string(),
    })
}

/// One MessagePack value that must fill `body` exactly.
fn decode_exact<T: DeserializeOwned>(
    tree: &str,
    key: &[u8],
    body: &[u8],
) -> Result<T, StorageError> {
    let mut rest = body;
    let mut de = rmp_serde::Deserializer::new(&mut rest);
    let value = T::deserialize(&mut de)
        .map_err(|e| StorageError::corrupt(tree, key, format_args!("bad entity: {e}")))?;
    let rest = de.get_ref().len();
    if rest != 0 {
        return Err(StorageError::corrupt(
            tree,
            key,
            format_args!("{rest} trailing bytes after entity"),
        ));
    }
    Ok(value)
}

/// Encode an OpenMLS entity as a versioned value.
pub(crate) fn encode_entity<T: Serialize + ?Sized>(
    tree: &str,
    value: &T,
) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::with_capacity(128);
    out.push(ENTITY_FORMAT);
    encode_into(tree, value, &mut out)?;
    Ok(out)
}

/// Decode a versioned OpenMLS entity; `key` is only used in the error.
pub(crate) fn decode_entity<T: DeserializeOwned>(
    tree: &str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&ENTITY_FORMAT, body)) => decode_exact(tree, key, body),
        Some((v, _)) => Err(StorageError::corrupt(
            tree,
            key,
            format_args!("unknown entity format version {v}"),
        )),
        None => Err(StorageError::corrupt(tree, key, "empty value")),
    }
}

/// Encode a project record (bincode 2, behind a version byte), for callers
/// that write the bytes themselves (e.g. with [`crate::SledStorage::put_raw`]
/// into a transaction); [`decode_record`] reads it back.
pub fn encode_record<T: bincode::Encode>(tree: &str, value: &T) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    encode_record_into(tree, value, &mut out)?;
    Ok(out)
}

/// [`encode_record`] appended to `out` (for values that hold many records);
/// on an error `out` is as it was.
pub fn encode_record_into<T: bincode::Encode>(
    tree: &str,
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), StorageError> {
    let start = out.len();
    out.push(RECORD_FORMAT_V1);
    bincode::encode_into_std_write(value, out, bincode_config()).map_err(|e| {
        out.truncate(start);
        StorageError::Encode {
            tree: tree.to_owned(),
            reason: e.to_string(),
        }
    })?;
    Ok(())
}

/// Decode a project record; trailing bytes are treated as corruption.
pub fn decode_record<T: bincode::Decode<()>>(
    tree: &str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT_V1, body)) => {
            let (value, used) = bincode::decode_from_slice(body, bincode_config())
                .map_err(|e| StorageError::corrupt(tree, key, format_args!("bad record: {e}")))?;
            if used != body.len() {
                return Err(StorageError::corrupt(
                    tree,
                    key,
                    format_args!("{} trailing bytes after record", body.len() - used),
                ));
            }
            Ok(value)
        }
        Some((v, _)) => Err(StorageError::corrupt(
            tree,
            key,
            format_args!("unknown record format version {v}"),
        )),
        None => Err(StorageError::corrupt(tree, key, "empty value")),
    }
}

/// Decode the leading fields of a record written by [`encode_record`] as
/// `T`, borrowing byte strings from `bytes` and ignoring what follows them:
/// for a reader that needs only the start of large records (a server
/// rebuilding an index from the headers of stored messages).
pub fn decode_record_head<'a, T: bincode::BorrowDecode<'a, ()>>(
    tree: &str,
    key: &[u8],
    bytes: &'a [u8],
) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT_V1, body)) => {
            bincode::borrow_decode_from_slice(body, bincode_config())
                .map(|(value, _)| value)
                .map_err(|e| StorageError::corrupt(tree, key, format_args!("bad record: {e}")))
        }
        Some((v, _)) => Err(StorageError::corrupt(
            tree,
            key,
            format_args!("unknown record format version {v}"),
        )),
        None => Err(StorageError::corrupt(tree, key, "empty value")),
    }
}

/// Lists (own leaf nodes, proposal queues) are stored as one entity, so
/// that reads need no scan and a whole list changes atomically: an array
/// holding each item's own encoding (from [`encode_item`]), so that an item
/// is found for removal by its bytes without knowing its type.
pub(crate) fn decode_list_items(
    tree: &str,
    key: &[u8],
    bytes: Option<&[u8]>,
) -> Result<Vec<ListItem>, StorageError> {
    match bytes {
        Some(b) => decode_entity(tree, key, b),
        None => Ok(Vec::new()),
    }
}

/// One item of a stored list, in its own encoding.
#[derive(Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub(crate) struct ListItem(Vec<u8>);

/// An OpenMLS value as an item of a stored list.
pub(crate) fn encode_item<T: Serialize + ?Sized>(
    tree: &str,
    value: &T,
) -> Result<ListItem, StorageError> {
    let mut out = Vec::new();
    encode_into(tree, value, &mut out)?;
    Ok(ListItem(out))
}

/// The value of a stored list's item; `key` (the list's) is only used in
/// the error.
pub(crate) fn decode_item<T: DeserializeOwned>(
    tree: &str,
    key: &[u8],
    item: &ListItem,
) -> Result<T, StorageError> {
    decode_exact(tree, key, &item.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(bincode::Encode, bincode::Decode, Debug, PartialEq)]
    struct Rec {
        a: u64,
        b: Vec<u8>,
    }

    #[test]
    fn entity_round_trip_and_errors() {
        let v = encode_entity("t", &vec![1u8, 2, 3]).unwrap();
        assert_eq!(v[0], ENTITY_FORMAT);
        let back: Vec<u8> = decode_entity("t", b"k", &v).unwrap();
        assert_eq!(back, vec![1, 2, 3]);
        for bad in [&[][..], &[9, b'[', b']'][..], &v[..v.len() - 1]] {
            let err = decode_entity::<Vec<u8>>("t", b"k", bad).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("tree t") && msg.contains("6b"), "{msg}");
        }
        let mut long = v.clone();
        long.push(0);
        let err = decode_entity::<Vec<u8>>("t", b"k", &long).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
        // A byte string is stored as bytes: one byte each, not two for
        // bytes of 128 and more as integers would.
        let big = vec![0xC8u8; 300];
        let v = encode_entity("t", &big).unwrap();
        assert!(v.len() <= 300 + 4, "{} bytes", v.len());
        assert_eq!(decode_entity::<Vec<u8>>("t", b"k", &v).unwrap(), big);
    }

    #[test]
    fn list_items_keep_their_own_encoding() {
        let items = [
            encode_item("t", &(1u16, vec![7u8; 3])).unwrap(),
            encode_item("t", &"two").unwrap(),
        ];
        let stored = encode_entity("t", &items[..]).unwrap();
        let back = decode_list_items("t", b"k", Some(&stored)).unwrap();
        assert!(back == items);
        let first: (u16, Vec<u8>) = decode_item("t", b"k", &back[0]).unwrap();
        assert_eq!(first, (1, vec![7; 3]));
        assert!(decode_list_items("t", b"k", None).unwrap().is_empty());
    }

    #[test]
    fn record_round_trip_and_errors() {
        let r = Rec {
            a: 7,
            b: vec![9; 10],
        };
        let bytes = encode_record("t", &r).unwrap();
        assert_eq!(decode_record::<Rec>("t", b"k", &bytes).unwrap(), r);
        assert!(decode_record::<Rec>("t", b"k", &bytes[..bytes.len() - 1]).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_record::<Rec>("t", b"k", &long).is_err());
        // A length prefix claiming 2^60 bytes must fail, not allocate.
        let huge = [RECORD_FORMAT_V1, 7, 0xff, 0, 0, 0, 0, 0, 0, 0, 0x10];
        assert!(decode_record::<Rec>("t", b"k", &huge).is_err());
    }
}
