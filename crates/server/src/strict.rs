//! A deserializer wrapper that reads every struct from a JSON object only.
//!
//! serde's derived `Deserialize` for a struct also accepts a sequence of its fields in
//! declaration order, and serde_json hands it one when asked for a struct and given an array
//! (serde-rs/serde#1587). For a request body that is a hazard, not a convenience: the order of
//! the fields decides the meaning (`{"reserve": ["p", 5, 1]}` reserves 5 for 1 ms), and no
//! documented request has that form. [`Strict`] wraps a deserializer and everything it hands
//! out (sequences, maps, enums, variants, seeds), and turns each request for a struct into a
//! request for a map, which refuses an array with serde's own "invalid type: sequence,
//! expected struct …" error.
//!
//! It also rewords, for a person, serde_json's errors about the form of an enum (a condition,
//! an op). serde_json says "expected value" for an object whose key is missing or not a string (`{}`),
//! and for anything but the closing `}` after the key's value (a second key, as in `{"exists":
//! "a", "absent": "b"}`: two conditions in one object), and for a value that is neither an
//! object nor a string; and "invalid type: unit variant" for a variant that takes a value given
//! by its name alone (`"exists"`). [`Strict`] says instead which names the enum takes, that the
//! object takes one key, or that the name needs its value. Errors inside the key's value and a
//! body cut short keep serde_json's words.
//!
//! It cannot reach a struct that serde buffers first (`#[serde(untagged)]`, `flatten`,
//! internally or adjacently tagged enums): none of the request bodies has one, and one added
//! would need a test here.

use std::cell::Cell;

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Error as _, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// A deserializer whose structs must be maps (see the module's documentation).
pub struct Strict<D>(pub D);

/// Passes a `deserialize_*` call through to the wrapped deserializer, with the visitor wrapped.
macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
                self.0.$method($($arg,)* Wrap(visitor))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    forward! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_identifier();
        deserialize_ignored_any();
    }

    /// The point of the wrapper: a struct is read as a map, so an array is refused.
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(Wrap(visitor))
    }

    /// An enum, with serde_json's "expected value" reworded where it is about the object's key
    /// (see the module's documentation).
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let stage = Cell::new(Stage::Start);
        let visitor = Staged { inner: Wrap(visitor), stage: &stage };
        self.0.deserialize_enum(name, variants, visitor).map_err(|e| {
            let said = e.to_string();
            let names = Names(variants);
            match stage.get() {
                Stage::Start | Stage::Name if said.starts_with("expected value") => {
                    D::Error::custom(format_args!("expected one of {names}"))
                }
                // A variant that takes a value, given by its name alone (`"exists"`).
                Stage::Content if said.starts_with("invalid type: unit variant") => {
                    D::Error::custom("expected an object with this name as its key and a value, not the name alone")
                }
                Stage::Done if said.starts_with("expected value") => D::Error::custom(format_args!(
                    "expected `}}` after the key's value: the object takes one key, one of {names} (give each its own object)"
                )),
                _ => e,
            }
        })
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }
}

/// How far an enum got: not started (neither an object nor a string), its variant's name, its
/// content, done. Only where it stopped tells what serde_json's "expected value" was about.
#[derive(Clone, Copy)]
enum Stage {
    Start,
    Name,
    Content,
    Done,
}

/// `a`, `b`, `c`.
struct Names(&'static [&'static str]);

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            write!(f, "{}`{name}`", if i == 0 { "" } else { ", " })?;
        }
        Ok(())
    }
}

/// An enum's visitor, access and variant access that record its [`Stage`].
struct Staged<'a, T> {
    inner: T,
    stage: &'a Cell<Stage>,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Staged<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.inner.expecting(f)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.stage.set(Stage::Name);
        self.inner.visit_enum(Staged { inner: data, stage: self.stage })
    }
}

impl<'a, 'de, A: EnumAccess<'de>> EnumAccess<'de> for Staged<'a, A> {
    type Error = A::Error;
    type Variant = Staged<'a, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.inner.variant_seed(seed)?;
        self.stage.set(Stage::Content);
        Ok((value, Staged { inner: variant, stage: self.stage }))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Staged<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        done(self.stage, self.inner.unit_variant())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        done(self.stage, self.inner.newtype_variant_seed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        done(self.stage, self.inner.tuple_variant(len, visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        done(self.stage, self.inner.struct_variant(fields, visitor))
    }
}

/// The variant's content was read: what follows it is the enum's own business.
fn done<R, E>(stage: &Cell<Stage>, result: Result<R, E>) -> Result<R, E> {
    if result.is_ok() {
        stage.set(Stage::Done);
    }
    result
}

/// A visitor whose nested deserializers (sequence elements, map keys and values, enum
/// variants, `Some` and newtype contents) are [`Strict`] too.
struct Wrap<V>(V);

/// Passes `visit_*` calls of plain values through unchanged.
macro_rules! plain {
    ($($method:ident($ty:ty);)*) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
                self.0.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.0.expecting(f)
    }

    plain! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.0.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.visit_some(Strict(deserializer))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.visit_newtype_struct(Strict(deserializer))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.visit_seq(Strict(seq))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.visit_map(Strict(map))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.0.visit_enum(Strict(data))
    }
}

/// A seed that deserializes through [`Strict`].
struct Seed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.0.deserialize(Strict(deserializer))
    }
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Strict<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.0.next_element_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Strict<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.0.next_key_seed(Seed(seed))
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.0.next_value_seed(Seed(seed))
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Strict<A> {
    type Error = A::Error;
    type Variant = Strict<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.0.variant_seed(Seed(seed))?;
        Ok((value, Strict(variant)))
    }
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Strict<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.0.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.0.newtype_variant_seed(Seed(seed))
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.0.tuple_variant(len, Wrap(visitor))
    }

    /// A struct variant's content is read as a map, as a struct is.
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.0.newtype_variant_seed(AsMap(visitor))
    }
}

/// A seed that reads its content as a map, for [`VariantAccess::struct_variant`].
struct AsMap<V>(V);

impl<'de, V: Visitor<'de>> DeserializeSeed<'de> for AsMap<V> {
    type Value = V::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        deserializer.deserialize_map(Wrap(self.0))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::Strict;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        key: String,
        n: i64,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    enum Op {
        Add(Inner),
        Put { key: String, value: serde_json::Value },
        Delete(String),
        Pair(String, u8),
        Nothing,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        ops: Vec<Op>,
        inner: Option<Inner>,
        #[serde(default)]
        value: Option<serde_json::Value>,
    }

    fn strict(json: &str) -> Result<Body, String> {
        let mut de = serde_json::Deserializer::from_str(json);
        let body = Body::deserialize(Strict(&mut de)).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        Ok(body)
    }

    #[test]
    fn structs_read_from_objects_as_serde_json_reads_them() {
        let json = r#"{"ops":[{"add":{"key":"a","n":-1}},{"put":{"key":"b","value":[1,{"x":[2]}]}},
            {"delete":"c"},{"pair":["d",7]},"nothing"],"inner":{"key":"e","n":2},"value":[[1],{"k":[]}]}"#;
        let plain: Body = serde_json::from_str(json).unwrap();
        assert_eq!(strict(json).unwrap(), plain);
        assert_eq!(plain.ops.len(), 5);
        // Arrays that are values stay arrays; tuples and sequences still read from arrays.
        assert_eq!(plain.value, Some(serde_json::json!([[1], {"k": []}])));
        assert_eq!(strict(r#"{"ops":[],"inner":null}"#).unwrap().inner, None);
    }

    #[test]
    fn a_struct_given_as_an_array_is_refused_at_every_depth() {
        // Each is accepted by serde_json alone.
        for json in [
            r#"[[],null]"#,
            r#"{"ops":[],"inner":["e",2]}"#,
            r#"{"ops":[{"add":["a",1]}],"inner":null}"#,
            r#"{"ops":[{"put":["b",1]}],"inner":null}"#,
        ] {
            assert!(serde_json::from_str::<Body>(json).is_ok(), "serde_json alone accepts {json}");
            let err = strict(json).unwrap_err();
            assert!(err.contains("invalid type: sequence, expected struct"), "{json}: {err}");
        }
        let err = strict(r#"{"ops":[{"put":["b",1]}],"inner":null}"#).unwrap_err();
        assert!(err.contains("struct variant Op::Put"), "{err}");
    }

    #[test]
    fn an_enum_without_its_key_or_with_two_is_told_what_it_takes() {
        let names = "`add`, `put`, `delete`, `pair`, `nothing`";
        let one_key = format!("expected `}}` after the key's value: the object takes one key, one of {names}");
        // serde_json alone says "expected value" for each.
        for (json, expected) in [
            (r#"{"ops":[{}],"inner":null}"#, format!("expected one of {names}")),
            (r#"{"ops":[5],"inner":null}"#, format!("expected one of {names}")),
            (r#"{"ops":[null],"inner":null}"#, format!("expected one of {names}")),
            (r#"{"ops":[{"delete":"a","pair":["b",1]}],"inner":null}"#, one_key.clone()),
            (r#"{"ops":[{"delete":"a"],"inner":null}"#, one_key.clone()),
            (r#"{"ops":[{"delete":"a",}],"inner":null}"#, one_key),
        ] {
            let alone = serde_json::from_str::<Body>(json).unwrap_err().to_string();
            assert!(alone.starts_with("expected value"), "{json}: {alone}");
            let err = strict(json).unwrap_err();
            assert!(err.starts_with(&expected), "{json}: {err}");
        }
        // A value that is neither an object nor a string, errors inside the variant, and a body
        // cut short keep serde_json's words.
        for (json, expected) in [
            (r#"{"ops":[{,"delete":"a"}],"inner":null}"#, "key must be a string at line 1 column 10"),
            (r#"{"ops":[{"delete": }],"inner":null}"#, "expected value at line 1 column 20"),
            (r#"{"ops":[{"delete":"a""#, "EOF while parsing an object at line 1 column 21"),
            (r#"{"ops":[{"nope":"a"}],"inner":null}"#, "unknown variant `nope`, expected one of"),
        ] {
            let err = strict(json).unwrap_err();
            assert!(err.starts_with(expected), "{json}: {err}");
        }
    }

    #[test]
    fn a_variant_that_takes_a_value_given_by_its_name_alone_is_told_so() {
        for json in [
            r#"{"ops":["delete"],"inner":null}"#,
            r#"{"ops":["pair"],"inner":null}"#,
            r#"{"ops":["put"],"inner":null}"#,
        ] {
            let alone = serde_json::from_str::<Body>(json).unwrap_err().to_string();
            assert!(alone.starts_with("invalid type: unit variant"), "{json}: {alone}");
            let err = strict(json).unwrap_err();
            assert!(err.starts_with("expected an object with this name as its key and a value"), "{json}: {err}");
        }
        assert_eq!(strict(r#"{"ops":["nothing"],"inner":null}"#).unwrap().ops, [Op::Nothing]);
    }

    #[test]
    fn other_errors_are_serde_jsons_own() {
        let err = strict(r#"{"ops":[{"add":{"key":"a","n":"x"}}],"inner":null}"#).unwrap_err();
        assert!(err.starts_with("invalid type: string \"x\", expected i64"), "{err}");
        let err = strict(r#"{"ops":[],"inner":null,"extra":1}"#).unwrap_err();
        assert!(err.starts_with("unknown field `extra`"), "{err}");
    }
}
