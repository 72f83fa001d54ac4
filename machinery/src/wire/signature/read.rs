//! Reading a [`Signature`] from Go's JSON: keys in any case, `null`s and unknown keys, integer fields
//! whose errors name the field and the number as sent, nested callbacks on a stack that grows as deep as
//! a chain is long, and `Headers` with a depth limit of their own.

use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::{deep, Headers, Signature};
use crate::wire::arg::{free_form_value, Arg};
use crate::wire::gotime;
use crate::wire::tolerant::{lenient_int, wire_fields, Lenient, LenientInt};

wire_fields!(
    enum SigField {
        Uuid = "UUID",
        Name = "Name",
        RoutingKey = "RoutingKey",
        Eta = "ETA",
        GroupUuid = "GroupUUID",
        GroupTaskCount = "GroupTaskCount",
        Args = "Args",
        Headers = "Headers",
        Priority = "Priority",
        Immutable = "Immutable",
        RetryCount = "RetryCount",
        RetryTimeout = "RetryTimeout",
        OnSuccess = "OnSuccess",
        OnError = "OnError",
        ChordCallback = "ChordCallback",
        BrokerMessageGroupId = "BrokerMessageGroupId",
        SqsReceiptHandle = "SQSReceiptHandle",
        StopTaskDeletionOnError = "StopTaskDeletionOnError",
        IgnoreWhenTaskNotRegistered = "IgnoreWhenTaskNotRegistered",
    }
);

struct EtaValue(Option<DateTime<Utc>>);

impl<'de> Deserialize<'de> for EtaValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        gotime::deserialize_opt(d).map(EtaValue)
    }
}

/// The raw JSON text of the next value: borrowed from the input when `BORROW` (serde_json reading a
/// string or byte slice, as [`Signature::from_json`] does), else boxed, which any deserializer can give
/// (`serde_json::from_value`, a reader). Integer fields and `Headers` are read through their text, so
/// that an error shows a number as it was sent; borrowing spares an allocation and a copy per field.
fn next_raw<'de, A: MapAccess<'de>, R, const BORROW: bool>(
    map: &mut A,
    read: impl FnOnce(&str) -> R,
) -> Result<R, A::Error> {
    if BORROW {
        Ok(read(map.next_value::<&'de RawValue>()?.get()))
    } else {
        Ok(read(map.next_value::<Box<RawValue>>()?.get()))
    }
}

/// Reads `Headers` from its raw text with a depth limit of its own ([`Signature::from_json`] lifts
/// serde_json's for the nesting of chains).
fn read_headers<'de, A: MapAccess<'de>, const BORROW: bool>(
    map: &mut A,
) -> Result<Option<Headers>, A::Error> {
    next_raw::<A, _, BORROW>(map, free_form_value)?
        .map_err(|reason| de::Error::custom(format!("Headers: {reason}")))
}

/// A tolerant integer field ([`lenient_int`]), its error naming the field.
fn int_field<'de, A: MapAccess<'de>, N: LenientInt, const BORROW: bool>(
    map: &mut A,
    field: &str,
) -> Result<N, A::Error> {
    match next_raw::<A, _, BORROW>(map, |text| lenient_int::<N>(text.trim())) {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(reason)) => Err(de::Error::custom(format!("{field}: {reason}"))),
        Err(error) => Err(de::Error::custom(format!("{field}: {error}"))),
    }
}

/// Reads a [`Signature`] as its `Deserialize` does, with its integer fields and `Headers` borrowed from
/// the input ([`next_raw`]): only for a deserializer that can lend its input's text.
pub(super) struct Borrowing<T>(PhantomData<fn() -> T>);

impl<T> Default for Borrowing<T> {
    fn default() -> Self {
        Borrowing(PhantomData)
    }
}

impl<'de, T> DeserializeSeed<'de> for Borrowing<T> {
    type Value = Signature<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Signature<T>, D::Error> {
        d.deserialize_map(SigVisitor::<T, true>(PhantomData))
    }
}

struct SigVisitor<T, const BORROW: bool>(PhantomData<fn() -> T>);

impl<'de, T, const BORROW: bool> Visitor<'de> for SigVisitor<T, BORROW> {
    type Value = Signature<T>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a machinery Signature object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Signature<T>, A::Error> {
        let mut sig = Signature::<T>::blank();
        while let Some(key) = map.next_key::<SigField>()? {
            match key {
                SigField::Uuid => sig.uuid = map.next_value::<Lenient<String>>()?.0,
                SigField::Name => sig.name = map.next_value::<Lenient<String>>()?.0,
                SigField::RoutingKey => sig.routing_key = map.next_value::<Lenient<String>>()?.0,
                SigField::Eta => sig.eta = map.next_value::<EtaValue>()?.0,
                SigField::GroupUuid => sig.group_uuid = map.next_value::<Lenient<String>>()?.0,
                SigField::GroupTaskCount => {
                    sig.group_task_count = int_field::<A, _, BORROW>(&mut map, "GroupTaskCount")?
                }
                SigField::Args => {
                    sig.args = map.next_value::<Option<Vec<Arg>>>()?.unwrap_or_default()
                }
                SigField::Headers => sig.headers = read_headers::<A, BORROW>(&mut map)?,
                SigField::Priority => {
                    sig.priority = int_field::<A, _, BORROW>(&mut map, "Priority")?
                }
                SigField::Immutable => sig.immutable = map.next_value::<Lenient<bool>>()?.0,
                SigField::RetryCount => {
                    sig.retry_count = int_field::<A, _, BORROW>(&mut map, "RetryCount")?
                }
                SigField::RetryTimeout => {
                    sig.retry_timeout = int_field::<A, _, BORROW>(&mut map, "RetryTimeout")?
                }
                SigField::OnSuccess => {
                    sig.on_success =
                        deep(|| map.next_value::<Option<Vec<Signature>>>())?.unwrap_or_default()
                }
                SigField::OnError => {
                    sig.on_error =
                        deep(|| map.next_value::<Option<Vec<Signature>>>())?.unwrap_or_default()
                }
                SigField::ChordCallback => sig.chord_callback = deep(|| map.next_value())?,
                SigField::BrokerMessageGroupId => {
                    sig.broker_message_group_id = map.next_value::<Lenient<String>>()?.0
                }
                SigField::SqsReceiptHandle => {
                    sig.sqs_receipt_handle = map.next_value::<Lenient<String>>()?.0
                }
                SigField::StopTaskDeletionOnError => {
                    sig.stop_task_deletion_on_error = map.next_value::<Lenient<bool>>()?.0
                }
                SigField::IgnoreWhenTaskNotRegistered => {
                    sig.ignore_when_task_not_registered = map.next_value::<Lenient<bool>>()?.0
                }
                SigField::Unknown => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(sig)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Signature<T>, E> {
        Err(E::custom("a machinery Signature cannot be null"))
    }
}

impl<'de, T> Deserialize<'de> for Signature<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(SigVisitor::<T, false>(PhantomData))
    }
}
