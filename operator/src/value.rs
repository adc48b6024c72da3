//! AMQP values as JSON, two ways.
//!
//! - Typed ([`value_to_typed`], [`typed_to_value`]): every value is a
//!   one-key object naming its AMQP type (`{"i16": -3}`, `{"table": {...}}`,
//!   `{"bytes": "<base64>"}`), so that an export restores each header with
//!   the exact type it had: integers of every width, timestamps, decimals,
//!   byte arrays, nested tables and arrays. Long strings that are not UTF-8
//!   are `{"longstr_b64": "..."}`.
//! - Plain ([`value_to_plain`]): for people (`show`, JSON output), types
//!   dropped.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{json, Map, Value};

/// A typed JSON value back to AMQP; `Err` says what is wrong.
pub fn typed_to_value(v: &Value) -> Result<AMQPValue, String> {
    let obj = v
        .as_object()
        .filter(|o| o.len() == 1)
        .ok_or_else(|| format!("expected a one-key object naming an AMQP type, got {v}"))?;
    let (ty, inner) = obj.iter().next().ok_or("empty object")?;
    let int = |lo: i128, hi: i128| -> Result<i128, String> {
        let n = inner
            .as_i64()
            .map(i128::from)
            .or_else(|| inner.as_u64().map(i128::from))
            .ok_or_else(|| format!("{ty}: expected an integer, got {inner}"))?;
        if n < lo || n > hi {
            return Err(format!("{ty}: {n} is out of range"));
        }
        Ok(n)
    };
    let text = || {
        inner
            .as_str()
            .ok_or_else(|| format!("{ty}: expected a string, got {inner}"))
    };
    let b64 = |s: &str| B64.decode(s).map_err(|e| format!("{ty}: bad base64: {e}"));
    // The ranges were checked by `int`, so the casts below cannot truncate.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(match ty.as_str() {
        "bool" => AMQPValue::Boolean(inner.as_bool().ok_or("bool: expected true or false")?),
        "i8" => AMQPValue::ShortShortInt(int(i8::MIN.into(), i8::MAX.into())? as i8),
        "u8" => AMQPValue::ShortShortUInt(int(0, u8::MAX.into())? as u8),
        "i16" => AMQPValue::ShortInt(int(i16::MIN.into(), i16::MAX.into())? as i16),
        "u16" => AMQPValue::ShortUInt(int(0, u16::MAX.into())? as u16),
        "i32" => AMQPValue::LongInt(int(i32::MIN.into(), i32::MAX.into())? as i32),
        "u32" => AMQPValue::LongUInt(int(0, u32::MAX.into())? as u32),
        "i64" => AMQPValue::LongLongInt(int(i64::MIN.into(), i64::MAX.into())? as i64),
        "timestamp" => AMQPValue::Timestamp(int(0, u64::MAX.into())? as u64),
        "f32" => AMQPValue::Float(f32::from_bits(
            int(0, u32::MAX.into()).map_err(|_| "f32: expected its IEEE bits as u32")? as u32,
        )),
        "f64" => AMQPValue::Double(f64::from_bits(
            int(0, u64::MAX.into()).map_err(|_| "f64: expected its IEEE bits as u64")? as u64,
        )),
        "decimal" => {
            let scale = inner.get("scale").and_then(Value::as_u64);
            let value = inner.get("value").and_then(Value::as_u64);
            match (scale, value) {
                (Some(s), Some(v)) if s <= u8::MAX.into() && v <= u32::MAX.into() => {
                    AMQPValue::DecimalValue(DecimalValue {
                        scale: s as u8,
                        value: v as u32,
                    })
                }
                _ => return Err("decimal: expected {\"scale\": u8, \"value\": u32}".into()),
            }
        }
        "shortstr" => AMQPValue::ShortString(
            ShortString::try_new(text()?).map_err(|e| format!("shortstr: {e}"))?,
        ),
        "longstr" => AMQPValue::LongString(LongString::from(text()?.as_bytes().to_vec())),
        "longstr_b64" => AMQPValue::LongString(LongString::from(b64(text()?)?)),
        "bytes" => AMQPValue::ByteArray(b64(text()?)?.into()),
        "array" => AMQPValue::FieldArray(FieldArray::from(
            inner
                .as_array()
                .ok_or("array: expected a JSON array")?
                .iter()
                .map(typed_to_value)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        "table" => AMQPValue::FieldTable(typed_to_table(inner)?),
        "void" => AMQPValue::Void,
        other => return Err(format!("unknown AMQP type {other:?}")),
    })
}

/// A typed JSON object back to a field table.
pub fn typed_to_table(v: &Value) -> Result<FieldTable, String> {
    let obj = v.as_object().ok_or("table: expected a JSON object")?;
    let mut t = FieldTable::default();
    for (k, v) in obj {
        let key = ShortString::try_new(k.clone()).map_err(|e| format!("key {k:?}: {e}"))?;
        t.insert(key, typed_to_value(v).map_err(|e| format!("{k}: {e}"))?);
    }
    Ok(t)
}

/// An AMQP value as typed JSON (see the module docs).
pub fn value_to_typed(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!({ "bool": b }),
        AMQPValue::ShortShortInt(n) => json!({ "i8": n }),
        AMQPValue::ShortShortUInt(n) => json!({ "u8": n }),
        AMQPValue::ShortInt(n) => json!({ "i16": n }),
        AMQPValue::ShortUInt(n) => json!({ "u16": n }),
        AMQPValue::LongInt(n) => json!({ "i32": n }),
        AMQPValue::LongUInt(n) => json!({ "u32": n }),
        AMQPValue::LongLongInt(n) => json!({ "i64": n }),
        // Floats as their bits: exact, NaN and infinities included.
        AMQPValue::Float(f) => json!({ "f32": f.to_bits() }),
        AMQPValue::Double(f) => json!({ "f64": f.to_bits() }),
        AMQPValue::DecimalValue(d) => json!({ "decimal": { "scale": d.scale, "value": d.value } }),
        AMQPValue::ShortString(s) => json!({ "shortstr": s.as_str() }),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => json!({ "longstr": text }),
            Err(_) => json!({ "longstr_b64": B64.encode(s.as_bytes()) }),
        },
        AMQPValue::FieldArray(a) => {
            json!({ "array": a.as_slice().iter().map(value_to_typed).collect::<Vec<_>>() })
        }
        AMQPValue::Timestamp(t) => json!({ "timestamp": t }),
        AMQPValue::FieldTable(t) => json!({ "table": table_to_typed(t) }),
        AMQPValue::ByteArray(b) => json!({ "bytes": B64.encode(b.as_slice()) }),
        AMQPValue::Void => json!({ "void": null }),
    }
}

/// A field table as a typed JSON object.
pub fn table_to_typed(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_typed(v)))
            .collect::<Map<_, _>>(),
    )
}

/// An AMQP value as plain JSON, for people: strings, numbers, objects.
pub fn value_to_plain(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => {
            json!(format!("{}e-{}", d.value, d.scale))
        }
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_plain).collect()),
        // RFC 3339 UTC; past year 9999 (no date to write) the number.
        AMQPValue::Timestamp(t) => {
            crate::message::rfc3339(*t).map_or_else(|| json!(t), |s| json!(s))
        }
        AMQPValue::FieldTable(t) => table_to_plain(t),
        AMQPValue::ByteArray(b) => json!(format!("base64:{}", B64.encode(b.as_slice()))),
        AMQPValue::Void => Value::Null,
    }
}

/// A field table as plain JSON.
pub fn table_to_plain(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), value_to_plain(v)))
            .collect(),
    )
}

/// An integer header of any width, as i64 (`None` for anything else).
pub fn as_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some((*n).into()),
        AMQPValue::ShortShortUInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::ShortUInt(n) => Some((*n).into()),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

/// A string header (short or long, UTF-8), else `None`.
pub fn as_text(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_type() -> FieldTable {
        let mut nested = FieldTable::default();
        nested.insert("deep".into(), AMQPValue::LongString("x".into()));
        let mut t = FieldTable::default();
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert("i8".into(), AMQPValue::ShortShortInt(-8));
        t.insert("u8".into(), AMQPValue::ShortShortUInt(200));
        t.insert("i16".into(), AMQPValue::ShortInt(-300));
        t.insert("u16".into(), AMQPValue::ShortUInt(60000));
        t.insert("i32".into(), AMQPValue::LongInt(-70000));
        t.insert("u32".into(), AMQPValue::LongUInt(4_000_000_000));
        t.insert("i64".into(), AMQPValue::LongLongInt(i64::MIN));
        t.insert("f32".into(), AMQPValue::Float(1.5));
        t.insert("f64".into(), AMQPValue::Double(f64::NAN));
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        );
        t.insert("ss".into(), AMQPValue::ShortString("short".into()));
        t.insert(
            "ls".into(),
            AMQPValue::LongString(vec![0xff, 0xfe, 0].into()),
        );
        t.insert(
            "arr".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongInt(1), AMQPValue::Void].into()),
        );
        t.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("tbl".into(), AMQPValue::FieldTable(nested));
        t.insert(
            "bytes".into(),
            AMQPValue::ByteArray(vec![1u8, 2, 255].into()),
        );
        t.insert("void".into(), AMQPValue::Void);
        t
    }

    #[test]
    fn typed_json_round_trips_every_type() {
        let t = every_type();
        let json = table_to_typed(&t);
        let text = serde_json::to_string(&json).unwrap();
        let back = typed_to_table(&serde_json::from_str(&text).unwrap()).unwrap();
        // NaN != NaN: compare the typed JSON (bits) instead of the values.
        assert_eq!(table_to_typed(&back), json);
        assert_eq!(back.inner().len(), t.inner().len());
    }

    #[test]
    fn bad_typed_json_is_an_error_not_a_panic() {
        assert!(typed_to_value(&json!({"i8": 300})).is_err());
        assert!(typed_to_value(&json!({"nope": 1})).is_err());
        assert!(typed_to_value(&json!(5)).is_err());
        assert!(typed_to_value(&json!({"bytes": "%%%"})).is_err());
    }
}
