"""Fixed vocabularies the synthetic population draws from.

Codes are real (LOINC, RxNorm, SNOMED CT, CPT, ICD-10-CM, UCUM units) so that the data looks
like what an EHR would send; names and places are common US ones. Redox's canonical dev-tools
patients, providers and facility (REDOX-REFERENCE §7.1) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sandbox.population.records import CPT, CVX, ICD10, LOINC, RXNORM, SNOMED, Coding, Provider

DISCHARGE_DISPOSITION_SYSTEM = "http://terminology.hl7.org/CodeSystem/discharge-disposition"
APPOINTMENT_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0276"

# ---------------------------------------------------------------- names and places

FAMILY_NAMES: tuple[str, ...] = (
    # Canonical dev-tools families first so demographic search can find them by index.
    "Bixby", "Carthwright", "Jones",
    "Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson",
    "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis",
    "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill",
    "Flores", "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter",
    "Roberts", "Gomez", "Phillips", "Evans", "Turner", "Diaz", "Parker", "Cruz", "Edwards", "Collins",
    "Reyes", "Stewart", "Morris", "Morales", "Murphy", "Cook", "Rogers", "Gutierrez", "Ortiz", "Morgan",
    "Cooper", "Peterson", "Bailey", "Reed", "Kelly", "Howard", "Ramos", "Kim", "Cox", "Ward",
    "Richardson", "Watson", "Brooks", "Chavez", "Wood", "James", "Bennett", "Gray", "Mendoza", "Ruiz",
    "Hughes", "Price", "Alvarez", "Castillo", "Sanders", "Patel", "Myers", "Long", "Ross", "Foster",
    "Jimenez", "Powell", "Jenkins", "Perry", "Russell", "Sullivan", "Bell", "Coleman", "Butler",
    "Henderson", "Barnes", "Gonzales", "Fisher", "Vasquez", "Simmons", "Romero", "Jordan", "Patterson",
    "Alexander", "Hamilton", "Graham", "Reynolds", "Griffin", "Wallace", "Moreno", "West", "Cole",
    "Hayes", "Bryant", "Herrera", "Gibson", "Ellis", "Tran", "Medina", "Aguilar", "Stevens", "Murray",
    "Ford", "Castro", "Marshall", "Owens", "Harrison", "Fernandez", "McDonald", "Woods", "Washington",
    "Kennedy", "Wells", "Vargas", "Henry", "Chen", "Freeman", "Webb", "Tucker", "Guzman", "Burns",
    "Crawford", "Olson", "Simpson", "Porter", "Hunter", "Gordon", "Mendez", "Silva", "Shaw", "Snyder",
    "Mason", "Dixon", "Munoz", "Hunt", "Hicks", "Holmes", "Palmer", "Wagner", "Black", "Robertson",
    "Boyd", "Rose", "Stone", "Salazar", "Fox", "Warren", "Mills", "Meyer", "Rice", "Schmidt", "Garza",
    "Daniels", "Ferguson", "Nichols", "Stephens", "Soto", "Weaver", "Ryan", "Gardner", "Payne", "Grant",
    "Dunn", "Kelley", "Spencer", "Hawkins", "Arnold", "Pierce", "Vazquez", "Hansen", "Peters", "Santos",
    "Hart", "Bradley", "Knight", "Elliott", "Cunningham", "Duncan", "Armstrong", "Hudson", "Carroll",
    "Lane", "Riley", "Andrews", "Alvarado", "Ray", "Delgado", "Berry", "Perkins", "Hoffman", "Johnston",
    "Matthews", "Pena", "Richards", "Contreras", "Willis", "Carpenter", "Lawrence", "Sandoval", "Le",
    "Pham", "Wang", "Li", "Zhang", "Liu", "Singh", "Shah", "Khan", "Ali", "Cohen", "Friedman", "Novak",
    "Kowalski", "Larsen", "Jensen", "Nielsen", "Schultz", "Becker", "Keller", "Weber", "Yamamoto",
)  # fmt: skip

MALE_GIVEN: tuple[str, ...] = (
    "Timothy", "Paul", "Walter", "Kent",
    "James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas", "Charles",
    "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Andrew", "Joshua",
    "Kenneth", "Kevin", "Brian", "George", "Edward", "Ronald", "Jason", "Jeffrey", "Ryan", "Jacob",
    "Gary", "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott", "Brandon", "Benjamin",
    "Samuel", "Gregory", "Alexander", "Frank", "Patrick", "Raymond", "Jack", "Dennis", "Jerry", "Tyler",
    "Aaron", "Jose", "Adam", "Nathan", "Henry", "Douglas", "Zachary", "Peter", "Kyle", "Noah", "Ethan",
    "Jeremy", "Christian", "Keith", "Roger", "Terry", "Austin", "Sean", "Gerald", "Carl", "Harold",
    "Dylan", "Arthur", "Lawrence", "Jordan", "Jesse", "Bryan", "Billy", "Bruce", "Gabriel", "Joe",
    "Logan", "Alan", "Juan", "Albert", "Willie", "Elijah", "Wayne", "Randy", "Vincent", "Mason",
    "Roy", "Ralph", "Bobby", "Russell", "Bradley", "Philip", "Eugene", "Luis", "Carlos", "Miguel",
    "Liam", "Lucas", "Oliver", "Aiden", "Caleb", "Isaac", "Owen", "Hector", "Diego", "Minh", "Wei",
    "Raj", "Omar", "Ahmed", "Hiroshi", "Sven", "Mateo", "Andre", "Marcus", "Darnell", "Terrence",
)  # fmt: skip

FEMALE_GIVEN: tuple[str, ...] = (
    "Barbara", "Elizabeth", "Myra",
    "Mary", "Patricia", "Jennifer", "Linda", "Susan", "Jessica", "Sarah", "Karen", "Lisa", "Nancy",
    "Betty", "Sandra", "Margaret", "Ashley", "Kimberly", "Emily", "Donna", "Michelle", "Carol",
    "Amanda", "Melissa", "Deborah", "Stephanie", "Dorothy", "Rebecca", "Sharon", "Laura", "Cynthia",
    "Amy", "Kathleen", "Angela", "Shirley", "Brenda", "Emma", "Anna", "Pamela", "Nicole", "Samantha",
    "Katherine", "Christine", "Helen", "Debra", "Rachel", "Carolyn", "Janet", "Maria", "Catherine",
    "Heather", "Diane", "Olivia", "Julie", "Joyce", "Victoria", "Ruth", "Virginia", "Lauren", "Kelly",
    "Christina", "Joan", "Evelyn", "Judith", "Andrea", "Hannah", "Megan", "Cheryl", "Jacqueline",
    "Martha", "Madison", "Teresa", "Gloria", "Sara", "Janice", "Ann", "Kathryn", "Abigail", "Sophia",
    "Frances", "Jean", "Alice", "Judy", "Isabella", "Julia", "Grace", "Amber", "Denise", "Danielle",
    "Marilyn", "Beverly", "Charlotte", "Natalie", "Theresa", "Diana", "Brittany", "Doris", "Kayla",
    "Alexis", "Lori", "Marie", "Ava", "Mia", "Harper", "Aaliyah", "Camila", "Lucia", "Ximena", "Mai",
    "Linh", "Mei", "Priya", "Fatima", "Aisha", "Yuki", "Ingrid", "Keisha", "Tamika", "Latoya", "Rosa",
)  # fmt: skip

GIVEN_NAMES: tuple[str, ...] = MALE_GIVEN + FEMALE_GIVEN
N_MALE_GIVEN = len(MALE_GIVEN)

STREET_NAMES: tuple[str, ...] = (
    "Hickory", "Oak", "Maple", "Cedar", "Pine", "Elm", "Walnut", "Willow", "Birch", "Chestnut", "Main",
    "Washington", "Lincoln", "Jefferson", "Madison", "Franklin", "Park", "Lake", "Hill", "River",
    "Sunset", "Highland", "Meadow", "Forest", "Spring", "Church", "Mill", "Prospect", "Ridge", "Valley",
    "Amber", "Ethan", "Old Sauk", "Fairchild", "Jackson", "Center", "Union", "Broad", "Market", "Grove",
)  # fmt: skip
STREET_SUFFIXES: tuple[str, ...] = (
    "Street",
    "Avenue",
    "Road",
    "Drive",
    "Lane",
    "Court",
    "Way",
    "Terrace",
    "Place",
    "Boulevard",
)


@dataclass(frozen=True, slots=True)
class Place:
    city: str
    state: str
    zip_prefix: str  # first three digits; the last two are drawn
    county: str
    area_code: str


PLACES: tuple[Place, ...] = (
    Place("Madison", "WI", "537", "Dane", "608"),
    Place("Monroe", "WI", "535", "Green", "608"),
    Place("Milwaukee", "WI", "532", "Milwaukee", "414"),
    Place("Green Bay", "WI", "543", "Brown", "920"),
    Place("Chicago", "IL", "606", "Cook", "312"),
    Place("Springfield", "IL", "627", "Sangamon", "217"),
    Place("Minneapolis", "MN", "554", "Hennepin", "612"),
    Place("Saint Paul", "MN", "551", "Ramsey", "651"),
    Place("Des Moines", "IA", "503", "Polk", "515"),
    Place("Clayton", "MO", "631", "Saint Louis", "314"),
    Place("Kansas City", "MO", "641", "Jackson", "816"),
    Place("Indianapolis", "IN", "462", "Marion", "317"),
    Place("Columbus", "OH", "432", "Franklin", "614"),
    Place("Cleveland", "OH", "441", "Cuyahoga", "216"),
    Place("Detroit", "MI", "482", "Wayne", "313"),
    Place("Ann Arbor", "MI", "481", "Washtenaw", "734"),
    Place("Pittsburgh", "PA", "152", "Allegheny", "412"),
    Place("Philadelphia", "PA", "191", "Philadelphia", "215"),
    Place("Boston", "MA", "021", "Suffolk", "617"),
    Place("Worcester", "MA", "016", "Worcester", "508"),
    Place("Hartford", "CT", "061", "Hartford", "860"),
    Place("Providence", "RI", "029", "Providence", "401"),
    Place("Brooklyn", "NY", "112", "Kings", "718"),
    Place("Albany", "NY", "122", "Albany", "518"),
    Place("Newark", "NJ", "071", "Essex", "973"),
    Place("Baltimore", "MD", "212", "Baltimore City", "410"),
    Place("Arlington", "VA", "222", "Arlington", "703"),
    Place("Richmond", "VA", "232", "Richmond City", "804"),
    Place("Raleigh", "NC", "276", "Wake", "919"),
    Place("Charlotte", "NC", "282", "Mecklenburg", "704"),
    Place("Atlanta", "GA", "303", "Fulton", "404"),
    Place("Nashville", "TN", "372", "Davidson", "615"),
    Place("Birmingham", "AL", "352", "Jefferson", "205"),
    Place("Miami", "FL", "331", "Miami-Dade", "305"),
    Place("Orlando", "FL", "328", "Orange", "407"),
    Place("Tampa", "FL", "336", "Hillsborough", "813"),
    Place("New Orleans", "LA", "701", "Orleans", "504"),
    Place("Houston", "TX", "770", "Harris", "713"),
    Place("Austin", "TX", "787", "Travis", "512"),
    Place("Dallas", "TX", "752", "Dallas", "214"),
    Place("San Antonio", "TX", "782", "Bexar", "210"),
    Place("Oklahoma City", "OK", "731", "Oklahoma", "405"),
    Place("Denver", "CO", "802", "Denver", "303"),
    Place("Salt Lake City", "UT", "841", "Salt Lake", "801"),
    Place("Phoenix", "AZ", "850", "Maricopa", "602"),
    Place("Albuquerque", "NM", "871", "Bernalillo", "505"),
    Place("Las Vegas", "NV", "891", "Clark", "702"),
    Place("Los Angeles", "CA", "900", "Los Angeles", "213"),
    Place("Agoura Hills", "CA", "913", "Los Angeles", "818"),
    Place("San Diego", "CA", "921", "San Diego", "619"),
    Place("San Francisco", "CA", "941", "San Francisco", "415"),
    Place("Sacramento", "CA", "958", "Sacramento", "916"),
    Place("Portland", "OR", "972", "Multnomah", "503"),
    Place("Beaverton", "OR", "970", "Washington", "503"),
    Place("Seattle", "WA", "981", "King", "206"),
    Place("Spokane", "WA", "992", "Spokane", "509"),
    Place("Boise", "ID", "837", "Ada", "208"),
    Place("Omaha", "NE", "681", "Douglas", "402"),
    Place("Honolulu", "HI", "968", "Honolulu", "808"),
    Place("Anchorage", "AK", "995", "Anchorage", "907"),
)

RACES: tuple[tuple[str, float], ...] = (
    ("White", 0.60),
    ("Black or African American", 0.13),
    ("Asian", 0.06),
    ("American Indian or Alaska Native", 0.01),
    ("Native Hawaiian or Other Pacific Islander", 0.005),
    ("Other Race", 0.075),
    (None, 0.12),  # type: ignore[list-item]  # declined / not recorded
)
LANGUAGES: tuple[tuple[str, float], ...] = (
    ("en", 0.84), ("es", 0.10), ("zh", 0.015), ("vi", 0.01), ("tl", 0.008), ("ar", 0.007),
    ("fr", 0.006), ("ko", 0.005), ("ru", 0.005), ("de", 0.004),
)  # fmt: skip
MARITAL_STATUSES: tuple[str, ...] = ("Married", "Single", "Divorced", "Widowed", "Separated")
EMAIL_DOMAINS: tuple[str, ...] = ("example.com", "example.net", "example.org", "test.net", "mail.test")

# ---------------------------------------------------------------- canonical dev-tools data


@dataclass(frozen=True, slots=True)
class CanonicalPatient:
    mrn: str
    ehr_id: str | None  # None: derived from the seed (Redox publishes none)
    nist_id: str | None
    family: str
    given: tuple[str, ...]
    birth_date: date
    sex: str
    ssn: str | None
    race: str | None
    ethnicity: str | None
    language: str | None
    marital_status: str | None
    address_line: str
    city: str
    state: str
    postal_code: str
    county: str
    phone_home: str | None
    phone_mobile: str | None
    email: str | None


# REDOX-REFERENCE §7.1. Elizabeth's and Kent's demographics are not published; ours are chosen to
# fit the family (same household as Timothy and Barbara, Walter's household for Elizabeth).
CANONICAL_PATIENTS: tuple[CanonicalPatient, ...] = (
    CanonicalPatient("0000000001", "e167267c-16c9-4fe3-96ae-9cff5703e90a", "a1d4ee8aba494ca", "Bixby",
                     ("Timothy", "Paul"), date(2008, 1, 6), "male", "101-01-0001", "Asian", "Not Hispanic or Latino",
                     "en", "Single", "4762 Hickory Street", "Monroe", "WI", "53566", "Green", "+18088675301",
                     None, None),
    CanonicalPatient("0000000002", "81ac9647-3a07-46b7-85b4-c5d09099fb3b", "ffc486eff2b04b8", "Bixby",
                     ("Barbara",), date(1982, 7, 24), "female", "202-02-0002", "White", "Not Hispanic or Latino",
                     "en", "Married", "4762 Hickory Street", "Monroe", "WI", "53566", "Green", "+18088675303",
                     "+19189368865", "barb.bixby@test.net"),
    CanonicalPatient("0000000003", "e3fedf48-c8bf-4728-845f-cb810001b571", "ef05d4068ee144f", "Carthwright",
                     ("Walter",), date(1945, 3, 4), "male", "303-03-0003", "Black or African American",
                     "Hispanic or Latino", "es", "Widowed", "648 Ethan Terrace", "Agoura Hills", "CA", "91301",
                     "Los Angeles", "+18088675310", None, "wc1945@test.net"),
    CanonicalPatient("0000000004", None, None, "Carthwright", ("Elizabeth",), date(1948, 9, 12), "female",
                     "404-04-0004", "White", "Not Hispanic or Latino", "en", "Widowed", "648 Ethan Terrace",
                     "Agoura Hills", "CA", "91301", "Los Angeles", "+18088675311", None, None),
    CanonicalPatient("0000000005", None, None, "Bixby", ("Kent",), date(1980, 2, 14), "male", None, "White",
                     "Not Hispanic or Latino", "en", "Married", "4762 Hickory Street", "Monroe", "WI", "53566",
                     "Green", "+18088675302", None, None),
    CanonicalPatient("4442362", None, None, "Jones", ("Myra",), date(1947, 5, 1), "female", "123-101-1234",
                     "White", "Not Hispanic or Latino", None, "Married", "1357 Amber Drive", "Beaverton", "OR",
                     "97006", "Washington", "+18162766909", None, "12313124@fake.com"),
)  # fmt: skip

CANONICAL_PROVIDERS: tuple[Provider, ...] = (
    Provider("4356789876", "Pat", "Granite", ("MD",)),
    Provider("4236464757", "John", "Slate", ("DO",)),
    Provider("2434534567", "Sharon", "Chalk", ("MD", "PhD")),
    Provider("8263749385", "Jim", "Mica", ("RN",)),
)
CANONICAL_FACILITY = "RES General Hospital"
CANONICAL_LAB = "Redox Lab WI"
PROVIDER_CREDENTIALS: tuple[tuple[str, ...], ...] = (("MD",), ("MD",), ("MD",), ("DO",), ("NP",), ("PA-C",))

# ---------------------------------------------------------------- encounters

ENCOUNTER_CLASSES: tuple[str, ...] = ("AMB", "IMP", "EMER", "OBSENC", "VR")
ENCOUNTER_CLASS_WEIGHTS: tuple[float, ...] = (0.62, 0.08, 0.12, 0.05, 0.13)
# Typical length (seconds, low..high) of each class; the index stores the drawn value.
ENCOUNTER_DURATION_S: dict[str, tuple[int, int]] = {
    "AMB": (15 * 60, 60 * 60),
    "IMP": (24 * 3600, 8 * 24 * 3600),
    "EMER": (2 * 3600, 12 * 3600),
    "OBSENC": (8 * 3600, 40 * 3600),
    "VR": (10 * 60, 30 * 60),
}
ENCOUNTER_TYPES: dict[str, tuple[Coding, ...]] = {
    "AMB": (
        Coding(CPT, "99213", "Office or other outpatient visit for the evaluation and management of an established patient, low complexity"),
        Coding(CPT, "99214", "Office or other outpatient visit for the evaluation and management of an established patient, moderate complexity"),
        Coding(CPT, "99203", "Office or other outpatient visit for the evaluation and management of a new patient, low complexity"),
        Coding(CPT, "99395", "Periodic comprehensive preventive medicine reevaluation and management, 18-39 years"),
        Coding(CPT, "99396", "Periodic comprehensive preventive medicine reevaluation and management, 40-64 years"),
        Coding(SNOMED, "185389009", "Follow-up visit (procedure)"),
    ),
    "IMP": (
        Coding(SNOMED, "32485007", "Hospital admission (procedure)"),
        Coding(SNOMED, "183452005", "Emergency hospital admission (procedure)"),
        Coding(CPT, "99223", "Initial hospital inpatient or observation care, high complexity"),
    ),
    "EMER": (
        Coding(CPT, "99284", "Emergency department visit for the evaluation and management of a patient, moderate complexity"),
        Coding(CPT, "99285", "Emergency department visit for the evaluation and management of a patient, high complexity"),
        Coding(SNOMED, "4525004", "Emergency department patient visit (procedure)"),
    ),
    "OBSENC": (
        Coding(CPT, "99221", "Initial hospital inpatient or observation care, straightforward or low complexity"),
        Coding(SNOMED, "448951000124107", "Admission to observation unit (procedure)"),
    ),
    "VR": (
        Coding(SNOMED, "448337001", "Telemedicine consultation with patient (procedure)"),
        Coding(CPT, "99442", "Telephone evaluation and management service, 11-20 minutes"),
    ),
}  # fmt: skip

REASONS: tuple[Coding, ...] = (
    Coding(ICD10, "I10", "Essential (primary) hypertension"),
    Coding(ICD10, "E11.9", "Type 2 diabetes mellitus without complications"),
    Coding(ICD10, "E78.5", "Hyperlipidemia, unspecified"),
    Coding(ICD10, "J06.9", "Acute upper respiratory infection, unspecified"),
    Coding(ICD10, "N39.0", "Urinary tract infection, site not specified"),
    Coding(ICD10, "L20.84", "Intrinsic (allergic) eczema"),
    Coding(ICD10, "M54.50", "Low back pain, unspecified"),
    Coding(ICD10, "R07.9", "Chest pain, unspecified"),
    Coding(ICD10, "R10.9", "Unspecified abdominal pain"),
    Coding(ICD10, "R51.9", "Headache, unspecified"),
    Coding(ICD10, "J45.909", "Unspecified asthma, uncomplicated"),
    Coding(ICD10, "K21.9", "Gastro-esophageal reflux disease without esophagitis"),
    Coding(ICD10, "F41.1", "Generalized anxiety disorder"),
    Coding(ICD10, "E03.9", "Hypothyroidism, unspecified"),
    Coding(ICD10, "Z00.00", "Encounter for general adult medical examination without abnormal findings"),
    Coding(ICD10, "Z00.129", "Encounter for routine child health examination without abnormal findings"),
)
INPATIENT_REASONS: tuple[Coding, ...] = (
    Coding(ICD10, "J18.9", "Pneumonia, unspecified organism"),
    Coding(ICD10, "I50.9", "Heart failure, unspecified"),
    Coding(ICD10, "I21.4", "Non-ST elevation (NSTEMI) myocardial infarction"),
    Coding(ICD10, "A41.9", "Sepsis, unspecified organism"),
    Coding(ICD10, "J44.1", "Chronic obstructive pulmonary disease with (acute) exacerbation"),
    Coding(ICD10, "N17.9", "Acute kidney failure, unspecified"),
    Coding(ICD10, "K35.80", "Unspecified acute appendicitis"),
    Coding(ICD10, "S72.001A", "Fracture of unspecified part of neck of right femur, initial encounter"),
    Coding(ICD10, "R07.9", "Chest pain, unspecified"),
)
DISCHARGE_DISPOSITIONS: tuple[tuple[Coding, float], ...] = (
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "home", "Home"), 0.72),
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "snf", "Skilled nursing facility"), 0.09),
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "rehab", "Rehabilitation"), 0.05),
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "other-hcf", "Other healthcare facility"), 0.05),
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "alt-home", "Alternative home"), 0.04),
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "aadvice", "Left against advice"), 0.02),
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "hosp", "Hospice"), 0.02),
    (Coding(DISCHARGE_DISPOSITION_SYSTEM, "exp", "Expired"), 0.01),
)
CLINIC_DEPARTMENTS: tuple[str, ...] = (
    "Family Medicine",
    "Internal Medicine",
    "Cardiology",
    "Endocrinology",
    "Orthopedics",
    "Dermatology",
)
INPATIENT_DEPARTMENTS: tuple[str, ...] = ("3S", "3N", "4W", "ICU")

# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Analyte:
    code: Coding
    unit: str | None
    low: float | None  # reference range
    high: float | None
    mean: float  # generator centre and spread
    sd: float
    decimals: int
    critical_low: float | None = None
    critical_high: float | None = None
    text_values: tuple[str, ...] = ()  # non-numeric analyte: normal value first
    value_type: str = "Numeric"
    # Component-only analyte (blood pressure panel): no value of its own, these components.
    components: tuple[Analyte, ...] = ()
    # Coded values as SNOMED codings (social history), parallel to text_values.
    value_codes: tuple[Coding, ...] = ()


@dataclass(frozen=True, slots=True)
class Panel:
    code: Coding
    category: str  # "laboratory" | "vital-signs" | "social-history" | "survey" | "exam"
    analytes: tuple[Analyte, ...]
    weight: float
    turnaround_s: tuple[int, int]  # collection to result


def _a(
    code: str, display: str, unit: str | None, low, high, mean, sd, decimals, crit_low=None, crit_high=None
):
    return Analyte(Coding(LOINC, code, display), unit, low, high, mean, sd, decimals, crit_low, crit_high)


def _t(code: str, display: str, values: tuple[str, ...], value_type: str = "Coded Entry"):
    return Analyte(
        Coding(LOINC, code, display), None, None, None, 0.0, 0.0, 0, text_values=values, value_type=value_type
    )


LAB_PANELS: tuple[Panel, ...] = (
    Panel(Coding(LOINC, "58410-2", "CBC panel - Blood by Automated count"), "laboratory", (
        _a("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 4.5, 11.0, 7.2, 2.2, 1, 1.0, 30.0),
        _a("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "10*6/uL", 4.2, 5.9, 4.9, 0.5, 2),
        _a("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 12.0, 17.5, 14.2, 1.6, 1, 7.0, 20.0),
        _a("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "%", 36.0, 52.0, 43.0, 4.5, 1),
        _a("787-2", "MCV [Entitic volume] by Automated count", "fL", 80.0, 100.0, 90.0, 6.0, 1),
        _a("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 150.0, 400.0, 260.0, 70.0, 0, 50.0, 1000.0),
    ), 0.28, (3600, 6 * 3600)),
    Panel(Coding(LOINC, "51990-0", "Basic metabolic panel - Blood"), "laboratory", (
        _a("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70.0, 99.0, 98.0, 22.0, 0, 40.0, 400.0),
        _a("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 7.0, 20.0, 14.0, 5.0, 0),
        _a("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.6, 1.3, 0.95, 0.25, 2, None, 10.0),
        _a("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 136.0, 145.0, 140.0, 3.0, 0, 120.0, 160.0),
        _a("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.5, 5.1, 4.2, 0.45, 1, 2.5, 6.5),
        _a("2075-0", "Chloride [Moles/volume] in Serum or Plasma", "mmol/L", 98.0, 107.0, 102.0, 3.0, 0),
        _a("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma", "mmol/L", 22.0, 29.0, 25.5, 2.5, 0),
        _a("17861-6", "Calcium [Mass/volume] in Serum or Plasma", "mg/dL", 8.5, 10.5, 9.5, 0.5, 1, 6.0, 13.0),
    ), 0.26, (3600, 8 * 3600)),
    Panel(Coding(LOINC, "24331-1", "Lipid panel - Serum or Plasma"), "laboratory", (
        _a("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", None, 200.0, 190.0, 38.0, 0),
        _a("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", None, 150.0, 135.0, 60.0, 0),
        _a("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 40.0, None, 52.0, 13.0, 0),
        _a("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation", "mg/dL", None, 100.0, 110.0, 32.0, 0),
    ), 0.16, (4 * 3600, 24 * 3600)),
    Panel(Coding(LOINC, "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood"), "laboratory", (
        _a("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "%", 4.0, 5.6, 5.9, 1.1, 1),
    ), 0.1, (4 * 3600, 48 * 3600)),
    Panel(Coding(LOINC, "3016-3", "Thyrotropin [Units/volume] in Serum or Plasma"), "laboratory", (
        _a("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "m[IU]/L", 0.4, 4.0, 2.1, 1.2, 2),
    ), 0.08, (4 * 3600, 48 * 3600)),
    Panel(Coding(LOINC, "24356-8", "Urinalysis complete panel - Urine"), "laboratory", (
        _t("5778-6", "Color of Urine", ("Yellow", "Amber", "Red"), "String"),
        _t("2888-6", "Protein [Mass/volume] in Urine", ("Negative", "Trace", "1+", "2+")),
        _t("25428-4", "Glucose [Presence] in Urine by Test strip", ("Negative", "Positive")),
        _t("5802-4", "Nitrite [Presence] in Urine by Test strip", ("Negative", "Positive")),
        _t("5799-2", "Leukocyte esterase [Presence] in Urine by Test strip", ("Negative", "Positive")),
        _a("5811-5", "Specific gravity of Urine by Test strip", "1", 1.005, 1.030, 1.018, 0.007, 3),
    ), 0.12, (3600, 12 * 3600)),
)  # fmt: skip

SYSTOLIC = _a("8480-6", "Systolic blood pressure", "mm[Hg]", 90.0, 130.0, 124.0, 15.0, 0, 70.0, 190.0)
DIASTOLIC = _a("8462-4", "Diastolic blood pressure", "mm[Hg]", 60.0, 85.0, 78.0, 10.0, 0, 40.0, 120.0)
# A component-only Observation (FHIR vital-signs profile): no value, systolic and diastolic parts.
BLOOD_PRESSURE = Analyte(
    Coding(LOINC, "85354-9", "Blood pressure panel with all children optional"),
    None, None, None, 0.0, 0.0, 0, components=(SYSTOLIC, DIASTOLIC),
)  # fmt: skip

VITALS_PANEL = Panel(
    Coding(
        LOINC, "85353-1", "Vital signs, weight, height, head circumference, oxygen saturation and BMI panel"
    ),
    "vital-signs",
    (
        _a("8867-4", "Heart rate", "/min", 60.0, 100.0, 76.0, 12.0, 0, 40.0, 150.0),
        BLOOD_PRESSURE,
        _a("8310-5", "Body temperature", "Cel", 36.1, 37.5, 36.8, 0.4, 1, 35.0, 40.0),
        _a("29463-7", "Body weight", "kg", None, None, 78.0, 18.0, 1),
        _a("8302-2", "Body height", "cm", None, None, 170.0, 10.0, 1),
        _a(
            "59408-5",
            "Oxygen saturation in Arterial blood by Pulse oximetry",
            "%",
            95.0,
            100.0,
            97.5,
            1.6,
            0,
            88.0,
            None,
        ),
        _a("9279-1", "Respiratory rate", "/min", 12.0, 20.0, 16.0, 2.5, 0, 8.0, 30.0),
    ),
    0.0,
    (0, 15 * 60),
)
SMOKING_VALUES = (
    Coding(SNOMED, "266919005", "Never smoker"),
    Coding(SNOMED, "8517006", "Former smoker"),
    Coding(SNOMED, "449868002", "Current every day smoker"),
    Coding(SNOMED, "428041000124106", "Current some day smoker"),
)
# One observation per "order" of these categories, taken at a visit like vital signs.
OTHER_PANELS: tuple[Panel, ...] = (
    Panel(Coding(LOINC, "72166-2", "Tobacco smoking status"), "social-history", (
        Analyte(Coding(LOINC, "72166-2", "Tobacco smoking status"), None, None, None, 0.0, 0.0, 0,
                text_values=tuple(c.display for c in SMOKING_VALUES), value_type="Coded Entry",
                value_codes=SMOKING_VALUES),
    ), 0.45, (0, 10 * 60)),
    Panel(Coding(LOINC, "55757-9", "Patient Health Questionnaire 2 item (PHQ-2) [Reported]"), "survey", (
        _a("55758-7", "Patient Health Questionnaire 2 item (PHQ-2) total score [Reported]", "{score}",
           0.0, 2.0, 0.9, 1.2, 0, None, None),
    ), 0.35, (0, 20 * 60)),
    Panel(Coding(LOINC, "10210-3", "Physical findings of General status Narrative"), "exam", (
        _t("10210-3", "Physical findings of General status Narrative",
           ("Well appearing, no acute distress", "Mild distress", "Appears fatigued", "Moderate distress"),
           "String"),
    ), 0.20, (0, 30 * 60)),
)  # fmt: skip
# Index 0..n-1 are lab panels, n is vitals, then the other categories; the results index stores
# this number per row (panel * 16 + analyte).
PANELS: tuple[Panel, ...] = LAB_PANELS + (VITALS_PANEL,) + OTHER_PANELS
VITALS_PANEL_INDEX = len(LAB_PANELS)
OTHER_PANEL_FIRST = VITALS_PANEL_INDEX + 1
RESULT_CATEGORIES: tuple[str, ...] = ("laboratory", "vital-signs", "social-history", "survey", "exam")
LAB_PERFORMING = ("Redox Lab WI", "Quest Diagnostics", "Labcorp", "Hospital Core Laboratory")

# ---------------------------------------------------------------- medications


@dataclass(frozen=True, slots=True)
class Drug:
    code: Coding
    dose: float
    unit: str
    route: Coding
    period: float  # frequency: once every `period` `period_unit`
    period_unit: str
    chronic: bool  # long-term therapy (no end date) vs a course


ORAL = Coding(SNOMED, "26643006", "Oral route")
SUBCUT = Coding(SNOMED, "34206005", "Subcutaneous route")
INHALED = Coding(SNOMED, "447694001", "Respiratory tract route")
INTRAMUSCULAR = Coding(SNOMED, "78421000", "Intramuscular route")

DRUGS: tuple[Drug, ...] = (
    Drug(Coding(RXNORM, "197361", "amlodipine 5 MG Oral Tablet"), 5, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "308135", "amlodipine 10 MG Oral Tablet"), 10, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "314076", "lisinopril 10 MG Oral Tablet"), 10, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "314077", "lisinopril 20 MG Oral Tablet"), 20, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"), 500, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "861007", "metformin hydrochloride 500 MG Oral Tablet"), 500, "mg", ORAL, 12, "h", True),
    Drug(Coding(RXNORM, "310798", "hydrochlorothiazide 25 MG Oral Tablet"), 25, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "312961", "simvastatin 20 MG Oral Tablet"), 20, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "259255", "atorvastatin 80 MG Oral Tablet"), 80, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "866924", "metoprolol tartrate 25 MG Oral Tablet"), 25, "mg", ORAL, 12, "h", True),
    Drug(Coding(RXNORM, "310429", "furosemide 20 MG Oral Tablet"), 20, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "966247", "levothyroxine sodium 0.05 MG Oral Tablet [Synthroid]"), 0.05, "mg", ORAL, 1, "d", True),
    Drug(Coding(RXNORM, "106892", "insulin isophane, human 70 UNT/ML / insulin regular, human 30 UNT/ML Injectable Suspension [Humulin]"), 20, "[iU]", SUBCUT, 12, "h", True),
    Drug(Coding(RXNORM, "745679", "200 ACTUAT albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"), 2, "{puff}", INHALED, 6, "h", True),
    Drug(Coding(RXNORM, "308182", "amoxicillin 250 MG Oral Capsule"), 250, "mg", ORAL, 8, "h", False),
    Drug(Coding(RXNORM, "308191", "amoxicillin 500 MG Oral Capsule"), 500, "mg", ORAL, 8, "h", False),
    Drug(Coding(RXNORM, "562251", "amoxicillin 250 MG / clavulanate 125 MG Oral Tablet"), 1, "{tbl}", ORAL, 8, "h", False),
    Drug(Coding(RXNORM, "834061", "penicillin V potassium 250 MG Oral Tablet"), 250, "mg", ORAL, 6, "h", False),
    Drug(Coding(RXNORM, "313782", "acetaminophen 325 MG Oral Tablet"), 650, "mg", ORAL, 6, "h", False),
    Drug(Coding(RXNORM, "198440", "acetaminophen 500 MG Oral Tablet"), 500, "mg", ORAL, 6, "h", False),
    Drug(Coding(RXNORM, "310965", "ibuprofen 200 MG Oral Tablet"), 400, "mg", ORAL, 8, "h", False),
    Drug(Coding(RXNORM, "197806", "ibuprofen 600 MG Oral Tablet"), 600, "mg", ORAL, 8, "h", False),
    Drug(Coding(RXNORM, "849574", "naproxen sodium 220 MG Oral Tablet"), 220, "mg", ORAL, 12, "h", False),
    Drug(Coding(RXNORM, "1049621", "oxycodone hydrochloride 5 MG Oral Tablet"), 5, "mg", ORAL, 6, "h", False),
    Drug(Coding(RXNORM, "1000126", "1 ML medroxyprogesterone acetate 150 MG/ML Injection"), 150, "mg", INTRAMUSCULAR, 3, "mo", False),
)  # fmt: skip

# ---------------------------------------------------------------- appointments

APPOINTMENT_TYPES: tuple[Coding, ...] = (
    Coding(APPOINTMENT_TYPE_SYSTEM, "CHECKUP", "A routine check-up, such as an annual physical"),
    Coding(APPOINTMENT_TYPE_SYSTEM, "FOLLOWUP", "A follow up visit from a previous appointment"),
    Coding(APPOINTMENT_TYPE_SYSTEM, "ROUTINE", "Routine appointment - default if not valued"),
    Coding(APPOINTMENT_TYPE_SYSTEM, "WALKIN", "A previously unscheduled walk-in visit"),
)
APPOINTMENT_REASONS: tuple[str, ...] = (
    "Check up", "Follow-up", "Annual physical", "Medication review", "Blood pressure check",
    "Diabetes management", "Lab review", "Sore throat", "Back pain", "Vaccination", "Skin rash",
    "Pre-operative evaluation", "Well child visit",
)  # fmt: skip
APPOINTMENT_DURATIONS: tuple[int, ...] = (15, 20, 30, 30, 45, 60)
CANCEL_REASONS: tuple[str, ...] = (
    "Patient request",
    "Provider unavailable",
    "Scheduling conflict",
    "Weather",
    "Rescheduled",
)

# ---------------------------------------------------------------- documents

NOTE_TYPES: tuple[Coding, ...] = (
    Coding(LOINC, "11506-3", "Progress note"),
    Coding(LOINC, "11488-4", "Consult note"),
    Coding(LOINC, "34117-2", "History and physical note"),
)
CDA_TYPES: tuple[Coding, ...] = (
    Coding(LOINC, "34133-9", "Summary of episode note"),
    Coding(LOINC, "18842-5", "Discharge summary"),
)
CDA_TITLES = {"34133-9": "Continuity of Care Document", "18842-5": "Discharge Summary"}
SUBJECTIVE = (
    "Patient reports feeling generally well.",
    "Patient reports intermittent symptoms over the past week.",
    "Patient presents for scheduled follow-up.",
    "Patient reports improvement since the last visit.",
    "Patient reports worsening symptoms despite treatment.",
)
PLANS = (
    "Continue current medications. Return in 3 months.",
    "Order labs and review at next visit.",
    "Adjust dosage and follow up in 4 weeks.",
    "Refer to specialist for further evaluation.",
    "Lifestyle counseling provided. Follow up as needed.",
)

# ---------------------------------------------------------------- problems, allergies, immunizations


@dataclass(frozen=True, slots=True)
class Problem:
    code: Coding  # ICD-10-CM
    snomed: Coding
    chronic: bool  # chronic problems stay active; the rest resolve


PROBLEMS: tuple[Problem, ...] = (
    Problem(Coding(ICD10, "I10", "Essential (primary) hypertension"), Coding(SNOMED, "59621000", "Essential hypertension"), True),
    Problem(Coding(ICD10, "E11.9", "Type 2 diabetes mellitus without complications"), Coding(SNOMED, "44054006", "Diabetes mellitus type 2"), True),
    Problem(Coding(ICD10, "E78.5", "Hyperlipidemia, unspecified"), Coding(SNOMED, "55822004", "Hyperlipidemia"), True),
    Problem(Coding(ICD10, "J45.909", "Unspecified asthma, uncomplicated"), Coding(SNOMED, "195967001", "Asthma"), True),
    Problem(Coding(ICD10, "E66.9", "Obesity, unspecified"), Coding(SNOMED, "414916001", "Obesity"), True),
    Problem(Coding(ICD10, "F32.A", "Depression, unspecified"), Coding(SNOMED, "35489007", "Depressive disorder"), True),
    Problem(Coding(ICD10, "M54.50", "Low back pain, unspecified"), Coding(SNOMED, "279039007", "Low back pain"), False),
    Problem(Coding(ICD10, "J06.9", "Acute upper respiratory infection, unspecified"), Coding(SNOMED, "54150009", "Upper respiratory infection"), False),
    Problem(Coding(ICD10, "N39.0", "Urinary tract infection, site not specified"), Coding(SNOMED, "68566005", "Urinary tract infectious disease"), False),
    Problem(Coding(ICD10, "K21.9", "Gastro-esophageal reflux disease without esophagitis"), Coding(SNOMED, "235595009", "Gastroesophageal reflux disease"), True),
    Problem(Coding(ICD10, "J18.9", "Pneumonia, unspecified organism"), Coding(SNOMED, "233604007", "Pneumonia"), False),
    Problem(Coding(ICD10, "S93.401A", "Sprain of unspecified ligament of right ankle, initial encounter"), Coding(SNOMED, "44465007", "Sprain of ankle"), False),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Allergen:
    substance: Coding
    category: str  # medication | food | environment
    kind: str  # allergy | intolerance


ALLERGENS: tuple[Allergen, ...] = (
    Allergen(Coding(RXNORM, "7980", "Penicillin G"), "medication", "allergy"),
    Allergen(Coding(RXNORM, "10831", "Sulfamethoxazole / Trimethoprim"), "medication", "allergy"),
    Allergen(Coding(RXNORM, "2670", "Codeine"), "medication", "intolerance"),
    Allergen(Coding(RXNORM, "1191", "Aspirin"), "medication", "intolerance"),
    Allergen(Coding(SNOMED, "762952008", "Peanut"), "food", "allergy"),
    Allergen(Coding(SNOMED, "102263004", "Eggs (edible)"), "food", "allergy"),
    Allergen(Coding(SNOMED, "3718001", "Cow's milk"), "food", "intolerance"),
    Allergen(Coding(SNOMED, "256259004", "Pollen"), "environment", "allergy"),
    Allergen(Coding(SNOMED, "111088007", "Latex"), "environment", "allergy"),
    Allergen(Coding(SNOMED, "288328004", "Bee venom"), "environment", "allergy"),
)
REACTIONS: tuple[Coding, ...] = (
    Coding(SNOMED, "271807003", "Eruption of skin"),
    Coding(SNOMED, "247472004", "Hives"),
    Coding(SNOMED, "422587007", "Nausea"),
    Coding(SNOMED, "39579001", "Anaphylaxis"),
    Coding(SNOMED, "267036007", "Dyspnea"),
)


@dataclass(frozen=True, slots=True)
class Vaccine:
    code: Coding  # CVX
    manufacturer: str
    route: Coding  # v3 RouteOfAdministration
    dose_ml: float


ROUTE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"
IM = Coding(ROUTE_SYSTEM, "IM", "Injection, intramuscular")
SC = Coding(ROUTE_SYSTEM, "SQ", "Injection, subcutaneous")
NASAL = Coding(ROUTE_SYSTEM, "NASINHLC", "Inhalation, nasal")
VACCINES: tuple[Vaccine, ...] = (
    Vaccine(Coding(CVX, "140", "Influenza, seasonal, injectable, preservative free"), "Sanofi Pasteur", IM, 0.5),
    Vaccine(Coding(CVX, "208", "COVID-19, mRNA, LNP-S, PF, 30 mcg/0.3 mL dose"), "Pfizer, Inc", IM, 0.3),
    Vaccine(Coding(CVX, "115", "Tdap"), "GlaxoSmithKline", IM, 0.5),
    Vaccine(Coding(CVX, "133", "Pneumococcal conjugate PCV 13"), "Pfizer, Inc", IM, 0.5),
    Vaccine(Coding(CVX, "43", "Hepatitis B vaccine, adult dosage"), "Merck and Co., Inc.", IM, 1.0),
    Vaccine(Coding(CVX, "03", "MMR"), "Merck and Co., Inc.", SC, 0.5),
    Vaccine(Coding(CVX, "187", "Zoster vaccine recombinant"), "GlaxoSmithKline", IM, 0.5),
    Vaccine(Coding(CVX, "111", "Influenza, live, intranasal"), "MedImmune, Inc.", NASAL, 0.2),
)  # fmt: skip
NOT_DONE_REASONS: tuple[Coding, ...] = (
    Coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", "PATOBJ", "patient objection"),
    Coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", "MEDPREC", "medical precaution"),
)

# ---------------------------------------------------------------- procedures


@dataclass(frozen=True, slots=True)
class ProcedureKind:
    code: Coding
    body_site: Coding | None
    minutes: int


PROCEDURES: tuple[ProcedureKind, ...] = (
    ProcedureKind(Coding(CPT, "36415", "Collection of venous blood by venipuncture"), Coding(SNOMED, "368208006", "Left upper arm structure"), 5),
    ProcedureKind(Coding(CPT, "93000", "Electrocardiogram, routine ECG with at least 12 leads"), Coding(SNOMED, "51185008", "Thoracic structure"), 15),
    ProcedureKind(Coding(CPT, "71046", "Radiologic examination, chest; 2 views"), Coding(SNOMED, "51185008", "Thoracic structure"), 20),
    ProcedureKind(Coding(CPT, "90471", "Immunization administration"), Coding(SNOMED, "368208006", "Left upper arm structure"), 5),
    ProcedureKind(Coding(SNOMED, "73761001", "Colonoscopy"), Coding(SNOMED, "71854001", "Colon structure"), 45),
    ProcedureKind(Coding(SNOMED, "274031008", "Rapid streptococcus antigen test"), None, 10),
    ProcedureKind(Coding(CPT, "12001", "Simple repair of superficial wounds, 2.5 cm or less"), Coding(SNOMED, "85562004", "Hand structure"), 30),
    ProcedureKind(Coding(SNOMED, "18286008", "Catheter ablation of tissue of heart"), Coding(SNOMED, "80891009", "Heart structure"), 180),
)  # fmt: skip
ORDER_PRIORITIES: tuple[tuple[str, float], ...] = (("routine", 0.82), ("urgent", 0.13), ("stat", 0.05))
