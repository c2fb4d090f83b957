//! Lenient field types for the typed preset decoders.
//!
//! Every field of a preset record is read as a [`Val`] (any JSON scalar, borrowed from the
//! line when the string has no escapes) or an [`Obj`] (a nested object). They never fail to
//! deserialize: a value of the wrong type is kept as `Val::Other` / `Obj::Invalid`, and the
//! decoder turns it into a [`DecodeError`] that names the field. This matters because
//! serde's own type errors quote the offending value, which could be key material.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{DecodeError, MAX_BATCH_RECORDS};

const EXPECTED_NUMBER: &str = "expected a number or numeric string";
const EXPECTED_STRING: &str = "expected a string";

/// One JSON value of a record field, as read.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Val<'a> {
    /// Not in the record, or `null`.
    #[default]
    Absent,
    Str(Cow<'a, str>),
    Int(i64),
    /// Numbers with a fraction or exponent, and integers beyond `i64`.
    Float(f64),
    Bool(bool),
    /// An object or array where a scalar was expected.
    Other,
}

/// A numeric value: integers are kept exact.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    pub(crate) fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
}

/// `""`, whitespace and `"-"` are how gateways write "no value".
fn is_blank(s: &str) -> bool {
    let t = s.trim();
    t.is_empty() || t == "-"
}

fn invalid(field: &'static str, reason: &str) -> DecodeError {
    DecodeError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

impl<'a> Val<'a> {
    /// A text field: strings trimmed, numbers formatted; blank, `"-"` and null are `None`.
    pub(crate) fn text(self, field: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError> {
        match self {
            Val::Absent => Ok(None),
            Val::Str(s) => {
                let t = s.trim();
                if t.is_empty() || t == "-" {
                    Ok(None)
                } else if t.len() == s.len() {
                    Ok(Some(s))
                } else {
                    Ok(Some(match s {
                        Cow::Borrowed(b) => Cow::Borrowed(b.trim()),
                        Cow::Owned(o) => Cow::Owned(o.trim().to_owned()),
                    }))
                }
            }
            Val::Int(i) => Ok(Some(Cow::Owned(i.to_string()))),
            Val::Float(f) => Ok(Some(Cow::Owned(f.to_string()))),
            Val::Bool(_) | Val::Other => Err(invalid(field, EXPECTED_STRING)),
        }
    }

    /// A number or numeric string; blank, `"-"` and null are `None`.
    pub(crate) fn num(&self, field: &'static str) -> Result<Option<Num>, DecodeError> {
        match self {
            Val::Absent => Ok(None),
            Val::Int(i) => Ok(Some(Num::Int(*i))),
            Val::Float(f) => Ok(Some(Num::Float(*f))),
            Val::Str(s) => {
                let t = s.trim();
                if t.is_empty() || t == "-" {
                    return Ok(None);
                }
                parse_num(t)
                    .map(Some)
                    .ok_or_else(|| invalid(field, EXPECTED_NUMBER))
            }
            Val::Bool(_) | Val::Other => Err(invalid(field, EXPECTED_NUMBER)),
        }
    }

    /// A number as f64 (latencies), `None` when absent.
    pub(crate) fn f64(&self, field: &'static str) -> Result<Option<f64>, DecodeError> {
        Ok(self.num(field)?.map(Num::as_f64))
    }

    /// An HTTP status: required (0 to 999), as a number or numeric string.
    pub(crate) fn status(&self, field: &'static str) -> Result<u16, DecodeError> {
        let n = self.num(field)?.ok_or(DecodeError::Missing(field))?;
        let ok = match n {
            Num::Int(i) => (0..=999).contains(&i).then_some(i as u16),
            Num::Float(f) => (f.fract() == 0.0 && (0.0..=999.0).contains(&f)).then_some(f as u16),
        };
        ok.ok_or_else(|| invalid(field, "expected an HTTP status code (0 to 999)"))
    }

    pub(crate) fn is_absent(&self) -> bool {
        match self {
            Val::Absent => true,
            Val::Str(s) => is_blank(s),
            _ => false,
        }
    }
}

/// Integers exactly, else a finite float.
pub(crate) fn parse_num(s: &str) -> Option<Num> {
    if let Ok(i) = s.parse::<i64>() {
        return Some(Num::Int(i));
    }
    // Rust also parses "inf", "NaN" and "infinity": not numbers here.
    if !s.bytes().any(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Num::Float)
}

struct ValVisitor {
    /// A list counts as its first value (Kong logs a repeated header as an array).
    first_of_list: bool,
}

impl<'de> Visitor<'de> for ValVisitor {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Val<'de>, E> {
        Ok(Val::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Val<'de>, E> {
        Ok(Val::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Val<'de>, E> {
        Ok(i64::try_from(v).map_or(Val::Float(v as f64), Val::Int))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Val<'de>, E> {
        Ok(Val::Float(v))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Val<'de>, E> {
        Ok(Val::Absent)
    }

    fn visit_none<E: de::Error>(self) -> Result<Val<'de>, E> {
        Ok(Val::Absent)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Val<'de>, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val<'de>, A::Error> {
        let first = if self.first_of_list {
            match seq.next_element::<Val<'de>>()? {
                Some(v @ (Val::Str(_) | Val::Int(_) | Val::Float(_))) => v,
                Some(Val::Absent) | None => Val::Absent,
                Some(_) => Val::Other,
            }
        } else {
            Val::Other
        };
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(first)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Val::Other)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Val<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValVisitor {
            first_of_list: false,
        })
    }
}

/// A header value: like [`Val`], but a list (a repeated header) counts as its first value.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Header<'a>(pub(crate) Val<'a>);

impl<'de: 'a, 'a> Deserialize<'de> for Header<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValVisitor {
            first_of_list: true,
        })
        .map(Header)
    }
}

/// A nested object of a record.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Obj<T> {
    /// Not in the record, or `null`.
    #[default]
    Absent,
    Some(T),
    /// Present but not an object.
    Invalid,
}

impl<T> Obj<T> {
    /// The object if present; an error naming `field` if it is not an object.
    pub(crate) fn take(self, field: &'static str) -> Result<Option<T>, DecodeError> {
        match self {
            Obj::Absent => Ok(None),
            Obj::Some(t) => Ok(Some(t)),
            Obj::Invalid => Err(invalid(field, "expected an object")),
        }
    }
}

struct ObjVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
    type Value = Obj<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Obj<T>, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Obj::Some)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Obj<T>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Obj::Invalid)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Obj<T>, E> {
        Ok(Obj::Absent)
    }

    fn visit_none<E: de::Error>(self) -> Result<Obj<T>, E> {
        Ok(Obj::Absent)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Obj<T>, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Obj<T>, E> {
        Ok(Obj::Invalid)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Obj<T>, E> {
        Ok(Obj::Invalid)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Obj<T>, E> {
        Ok(Obj::Invalid)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Obj<T>, E> {
        Ok(Obj::Invalid)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Obj<T>, E> {
        Ok(Obj::Invalid)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ObjVisitor(PhantomData))
    }
}

/// A JSON array of at most [`MAX_BATCH_RECORDS`] elements: the visitor stops at the first
/// element past the limit, so a huge batch is refused before it is built.
#[derive(Debug)]
pub(crate) struct Bounded<T>(pub(crate) Vec<T>);

struct BoundedVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for BoundedVisitor<T> {
    type Value = Bounded<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of at most {MAX_BATCH_RECORDS} records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bounded<T>, A::Error> {
        // size_hint is the caller's claim, not a fact: never trust it past the limit.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element()? {
            if out.len() == MAX_BATCH_RECORDS {
                return Err(de::Error::custom(format_args!(
                    "batch of more than {MAX_BATCH_RECORDS} records"
                )));
            }
            out.push(v);
        }
        Ok(Bounded(out))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Bounded<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(BoundedVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Rec<'a> {
        #[serde(borrow)]
        a: Val<'a>,
        #[serde(borrow)]
        h: Header<'a>,
        #[serde(borrow)]
        o: Obj<Inner<'a>>,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default)]
    struct Inner<'a> {
        #[serde(borrow)]
        x: Val<'a>,
    }

    fn rec(s: &str) -> Rec<'_> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn values_are_lenient_and_borrowed() {
        let r = rec(r#"{"a":"plain","h":["first","second"],"o":{"x":5,"y":[1,{"z":2}]},"zz":{}}"#);
        assert!(matches!(r.a, Val::Str(Cow::Borrowed("plain"))));
        assert_eq!(r.h.0, Val::Str(Cow::Borrowed("first")));
        assert!(matches!(r.o, Obj::Some(Inner { x: Val::Int(5) })));

        let r = rec(r#"{"a":"esc\"aped","h":"one","o":"not an object"}"#);
        assert!(matches!(r.a, Val::Str(Cow::Owned(ref s)) if s == "esc\"aped"));
        assert_eq!(r.h.0, Val::Str(Cow::Borrowed("one")));
        assert!(matches!(r.o, Obj::Invalid));
        assert_eq!(
            r.o.take("o").unwrap_err().to_string(),
            "field `o`: expected an object"
        );

        let r = rec(r#"{"a":{"k":[1,2]},"h":[{"k":1}],"o":null}"#);
        assert_eq!(r.a, Val::Other);
        assert_eq!(r.h.0, Val::Other);
        assert!(matches!(r.o, Obj::Absent));

        let r = rec(r#"{"a":18446744073709551615,"h":[]}"#);
        assert_eq!(r.a, Val::Float(18446744073709551615.0));
        assert_eq!(r.h.0, Val::Absent);
    }

    #[test]
    fn accessors() {
        let s = |v: &str| Val::Str(Cow::Owned(v.to_owned()));
        assert_eq!(s(" 200 ").status("st"), Ok(200));
        assert_eq!(Val::Int(401).status("st"), Ok(401));
        assert_eq!(Val::Float(429.0).status("st"), Ok(429));
        assert_eq!(Val::Absent.status("st"), Err(DecodeError::Missing("st")));
        assert_eq!(s("-").status("st"), Err(DecodeError::Missing("st")));
        let nan = invalid("st", EXPECTED_NUMBER);
        assert_eq!(s("abc").status("st"), Err(nan.clone()));
        assert_eq!(s("NaN").status("st"), Err(nan.clone()));
        assert_eq!(Val::Other.status("st"), Err(nan.clone()));
        assert_eq!(Val::Bool(true).status("st"), Err(nan));
        let range = invalid("st", "expected an HTTP status code (0 to 999)");
        assert_eq!(Val::Int(1000).status("st"), Err(range.clone()));
        assert_eq!(Val::Float(200.5).status("st"), Err(range.clone()));
        assert_eq!(Val::Int(-1).status("st"), Err(range));

        assert_eq!(s("0.012").f64("t"), Ok(Some(0.012)));
        assert_eq!(s("12").num("t"), Ok(Some(Num::Int(12))));
        assert_eq!(s("").num("t"), Ok(None));
        assert_eq!(s("1e3").f64("t"), Ok(Some(1000.0)));

        assert_eq!(s("  x ").text("f"), Ok(Some(Cow::Borrowed("x"))));
        assert_eq!(s("-").text("f"), Ok(None));
        assert_eq!(Val::Int(7).text("f"), Ok(Some(Cow::Borrowed("7"))));
        assert_eq!(Val::Other.text("f"), Err(invalid("f", EXPECTED_STRING)));
        assert!(s(" - ").is_absent());
        assert!(!Val::Int(0).is_absent());
    }
}
