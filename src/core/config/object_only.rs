//! Reads the configuration structs from JSON objects only.
//!
//! A derived `Deserialize` calls `deserialize_struct`, which in serde_json
//! 1.0 also accepts an array of the field values in declaration order, so
//! serde_derive emits a `visit_seq` for every struct. The schema allows
//! only objects, and the array readers made the release module about
//! 13 KB larger (rustc 1.95, `make build`).
//!
//! [`deserialize_from_object!`] implements `Deserialize` for a struct that
//! derives it with `#[serde(remote = "Self")]`, and the derived code then
//! reads the struct through `deserialize_map`. A JSON array in a struct's
//! place fails with serde's "invalid type: sequence, expected struct ...",
//! as any other wrong type does, which the configuration error shows as
//! "invalid type: array, expected an object".

use serde::de::{Deserializer, Visitor};

/// Wraps a deserializer and turns the derived code's `deserialize_struct`
/// call into `deserialize_map`.
pub(super) struct ObjectOnly<D>(pub(super) D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    // Derived struct code calls only `deserialize_struct`. The trait
    // requires the other methods, and they go to the wrapped deserializer's
    // `deserialize_any`.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Implements `Deserialize` for structs that derive it with
/// `#[serde(remote = "Self")]`, which makes the derived code an inherent
/// `deserialize` function, so that it reads them through [`ObjectOnly`].
macro_rules! deserialize_from_object {
    ($($raw:ident),+ $(,)?) => {$(
        impl<'de> serde::Deserialize<'de> for $raw {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                $raw::deserialize($crate::core::config::object_only::ObjectOnly(deserializer))
            }
        }
    )+};
}

pub(super) use deserialize_from_object;
